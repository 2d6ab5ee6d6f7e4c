"""Sequence parallelism: the real default model, failures, byte formulas, placement balance, torchrun."""

import os
import subprocess
import sys
import time

import pytest
import torch
from csps.parallel.sharding import causal_work_per_rank
from sp_harness import max_logit_diff, run

from csps.core import kv_placement as kp
from csps.core.sampling_params import SamplingParams
from csps.engine.weights import load_model_weights
from csps.errors import CspsError
from csps.llm import create_engine, make_engine_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def smollm2():
    from csps.engine.tokenizer import Tokenizer, load_tokenizer

    return load_model_weights("smollm2", torch.float32), Tokenizer(load_tokenizer("smollm2"))


@pytest.mark.slow
def test_smollm2_layouts_reproduce_single_process(smollm2):
    weights, tok = smollm2
    with open(os.path.join(os.path.dirname(REPO), "shared", "data", "books", "persuasion.txt")) as f:
        text = f.read()[:3000]
    long_ids = tok.encode(text)[:400]
    work = [[("long", long_ids), ("short", tok.encode("The capital of France is"))],
            [("again", long_ids[:300] + tok.encode(" Summarize the passage."))]]
    kw = dict(token_budget=64, num_blocks=128, max_model_len=2048, sp_threshold_tokens=128)
    ref = run(weights, work, tokenizer=tok, **kw)
    for sp, tp in [(2, 1), (4, 1), (1, 2), (2, 2)]:
        got = run(weights, work, sp=sp, tp=tp, tokenizer=tok, **kw)
        assert got.tokens == ref.tokens, f"sp={sp} tp={tp}"
        assert max_logit_diff(got, ref) <= 1e-3, f"sp={sp} tp={tp}"
        assert got.cached["again"] > 0


def test_a_failing_rank_surfaces_one_clear_error():
    cfg = make_engine_config(model="dummy:tiny", dtype="float32", sp=2, token_budget=64, num_blocks=64,
                             max_model_len=1024, sp_threshold_tokens=32)
    from dataclasses import replace

    cfg = replace(cfg, debug_fault=(1, 3))
    engine = create_engine(cfg, max_model_len=1024, load_tokenizer_=False)
    engine.add_request(list(range(5, 300)), SamplingParams(max_tokens=5, ignore_eos=True))
    t0 = time.time()
    with pytest.raises(CspsError, match="rank 1 failed: RuntimeError: injected fault at step 3"):
        while engine.has_unfinished():
            engine.step()
    assert time.time() - t0 < 30
    with pytest.raises(CspsError, match="dead"):
        engine.step()
    engine.shutdown()


def test_pass_q_decode_bytes_do_not_grow_with_context():
    cfg = make_engine_config(model="dummy:tiny", dtype="float32", sp=2, token_budget=2048, num_blocks=1200,
                             max_model_len=20000, sp_threshold_tokens=64, enable_prefix_caching=False)
    engine = create_engine(cfg, max_model_len=20000, load_tokenizer_=False)
    per_token, plan_bytes = {}, {}
    try:
        for n in (1024, 4096, 16384):
            engine.add_request([7 + i % 1000 for i in range(n)], SamplingParams(max_tokens=4, ignore_eos=True))
            while engine.has_unfinished():
                engine.step()
            decode_steps = [r for r in engine.step_log if r.num_decode_tokens and not r.num_prefill_tokens]
            last = decode_steps[-1].bytes_by_kind
            per_token[n] = (last.get("pass_q", 0), last.get("pass_q_out", 0), last.get("pass_kv", 0))
            plan_bytes[n] = last["plan"]
    finally:
        engine.shutdown()
    assert per_token[1024] == per_token[4096] == per_token[16384]
    # the step plan carries what changed, not the block tables: its bytes do not grow with the context
    # (a block table of 16k tokens alone would be 1,024 block ids); integers may take a byte more to encode
    assert max(plan_bytes.values()) - min(plan_bytes.values()) <= 8, plan_bytes
    assert plan_bytes[16384] < 256  # 192 bytes here; the block tables alone were 2.6 kB at 16k before
    q_bytes, out_bytes, kv_bytes = per_token[1024]
    m = engine.model_config  # one query of Hq·D fp32 to the other rank per layer, partials back
    assert q_bytes == m.num_layers * m.num_heads * m.head_dim * 4
    assert out_bytes == m.num_layers * m.num_heads * (m.head_dim * 4 + 4)
    assert kv_bytes == 0


@pytest.mark.parametrize("sp", [2, 4])
def test_zigzag_placement_balances_causal_work(sp):
    for start, n in [(0, 4096), (8192, 4096), (0, 16384), (3 * 512, 2048)]:
        shards = kp.ranges_per_rank(start, start + n, sp, 16)
        work = causal_work_per_rank(shards, num_cached_tokens=0)
        mean = sum(work) / sp
        assert max(abs(w - mean) for w in work) <= 0.05 * mean, (start, n, work)
        assert max(kp.shares(start, start + n, sp, 16)) - min(kp.shares(start, start + n, sp, 16)) <= 16


def test_torchrun_launch_two_ranks(tmp_path):
    from csps.parallel.launch import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "csps.cli", "generate", "--model", "dummy:tiny", "--dtype", "float32", "--sp", "2",
           "--sp-threshold", "16", "--max-tokens", "6", "-v",
           "one two three four five six seven eight nine ten eleven twelve thirteen fourteen"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "layout sp=2 x tp=1" in p.stderr and "6 generated" in p.stderr


def test_torchrun_serves_from_rank_0_only():
    # torchrun starts `csps serve` twice: rank 0 serves HTTP (its engine process joins the torchrun world as
    # rank 0), rank 1 only serves rank 0's step plans
    import httpx
    from csps.parallel.launch import free_port
    from csps.server.testing import ServerProcess

    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port())]
    with ServerProcess(["--model", "dummy:tiny", "--dtype", "float32", "--sp", "2", "--sp-threshold", "16"],
                       launcher=launcher, timeout_s=240) as srv:
        r = httpx.post(srv.url + "/v1/completions", json={"model": "dummy:tiny", "prompt": list(range(3, 40)),
                                                          "max_tokens": 5, "temperature": 0}, timeout=120)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
        assert srv.log.count("csps API listening on") == 1
        assert "layout sp=2 x tp=1" in srv.log
