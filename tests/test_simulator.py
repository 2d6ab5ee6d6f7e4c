"""The simulator drives the real scheduler with cost-model step times; it must reproduce the known ratios
(docs/background.md): near-linear SP prefill scaling on NVLink, Sarathi-Serve's chunk-512 overhead bound,
pass-Q decode traffic independent of context, and stall-free batching vs prefill-first."""

from __future__ import annotations

import json

import pytest

from csps.bench.simulator import (
    Strategy,
    kv_tokens_per_rank,
    simulate,
    standard_strategies,
)
from csps.bench.workloads import WorkloadConfig, make_workload
from csps.errors import CspsError
from csps.perf.hardware import get_profile
from csps.presets import preset_config

LLAMA3_8B = preset_config("llama3-8b")
H100 = get_profile("h100")


def _specs(**kw):
    return make_workload(WorkloadConfig(**kw), with_ids=False)


def _ttft(specs, strategy):
    return simulate(specs, strategy, LLAMA3_8B, H100).summary["ttft_s"]["mean"]


def test_sp_ttft_halves_per_doubling_for_256k_on_nvlink():
    specs = _specs(prompt_len=262144, output_len=1)
    t1 = _ttft(specs, Strategy("sp1", sp=1))
    for sp in (2, 4, 8):
        t = _ttft(specs, Strategy(f"sp{sp}", sp=sp, exchange="pass_kv"))
        assert t1 / (sp * t) >= 0.85, (sp, t1, t)


def test_chunk512_prefill_overhead_at_most_25_percent():
    for prompt in (4096, 16384, 65536):
        specs = _specs(prompt_len=prompt, output_len=1)
        chunked = _ttft(specs, Strategy("chunked", token_budget=512))
        whole = _ttft(specs, Strategy("whole", token_budget=prompt))
        assert whole < chunked <= 1.25 * whole, (prompt, chunked / whole)


def test_pass_q_decode_bytes_do_not_grow_with_context_moving_kv_does():
    def decode_bytes(context, decode):
        run = simulate(_specs(prompt_len=context, output_len=8), Strategy("s", sp=4, decode=decode,
                                                                            sp_threshold_tokens=1024),
                       LLAMA3_8B, H100)
        decode_steps = [s for s in run.steps if s.num_decode_tokens and not s.num_prefill_tokens]
        assert decode_steps
        return [sum(s.bytes_by_kind.values()) for s in decode_steps]

    short, long = decode_bytes(16384, "pass_q"), decode_bytes(131072, "pass_q")
    assert short[0] > 0 and set(short) == set(long) == {short[0]}
    kv_short, kv_long = decode_bytes(16384, "move_kv"), decode_bytes(131072, "move_kv")
    assert kv_long[0] / kv_short[0] == pytest.approx(8, rel=0.01)
    assert kv_short[0] > 100 * short[0]


def test_stall_free_vs_prefill_first_with_a_long_prompt_arriving():
    """32 ongoing decodes, a 32k prompt arrives: Sarathi-Serve's claim, in simulation."""
    specs = _specs(num_prompts=32, prompt_len=1024, output_len=64, long_prompt_len=32768, long_output_len=4,
                   long_arrival_s=1.0)
    runs = {p: simulate(specs, Strategy(p, policy=p, token_budget=512), LLAMA3_8B, H100)
            for p in ("stall-free", "prefill-first")}
    sf, pf = runs["stall-free"].summary, runs["prefill-first"].summary
    assert sf["num_finished"] == pf["num_finished"] == 33
    assert pf["tbt_s"]["p99"] >= 4 * sf["tbt_s"]["p99"]
    assert sf["long_prompt_ttft_s"] <= 1.3 * pf["long_prompt_ttft_s"]
    # prefill-first runs the whole long prompt in one step; stall-free never exceeds the budget
    assert max(s.num_prefill_tokens for s in runs["prefill-first"].steps) == 32768
    assert max(s.num_prefill_tokens + s.num_decode_tokens for s in runs["stall-free"].steps) <= 512


def test_real_scheduler_budgets_per_rank_and_sp_spreads_a_long_prompt():
    run = simulate(_specs(prompt_len=65536, output_len=4), Strategy("sp4", sp=4, token_budget=512),
                   LLAMA3_8B, H100)
    prefill_steps = [s for s in run.steps if s.num_prefill_tokens]
    assert max(s.num_prefill_tokens for s in prefill_steps) == 4 * 512  # every rank's budget, each step
    assert len(prefill_steps) == 65536 // 2048
    used = run.summary["peak_kv_bytes_per_rank"]
    assert len(used) == 4 and max(used) <= 1.05 * min(used)  # zigzag keeps KV even


def test_serve_style_poisson_workload_finishes_with_metrics():
    specs = _specs(num_prompts=60, prompt_len=2048, output_len=32, range_ratio=0.5, request_rate_per_s=20.0)
    runs = {s.name: simulate(specs, s, LLAMA3_8B, H100).summary for s in standard_strategies(8)}
    assert len(runs) == 5
    for name, s in runs.items():
        assert s["num_finished"] == 60, name
        assert s["queue_s"]["p50"] >= 0 and s["tbt_s"]["p99"] > 0 and s["ttft_s"]["max"] > 0
        assert 0 < s["fraction_of_peak"] < 1
    assert runs["sarathi-tp8"]["bytes_total_by_kind"]["tp_allreduce"] > 0


def test_kv_capacity_from_profile_memory_and_clear_errors():
    assert kv_tokens_per_rank(LLAMA3_8B, H100, 1, 2) == pytest.approx((0.9 * 80e9 - 16.06e9) / 131072, rel=0.01)
    with pytest.raises(CspsError, match="does not fit"):
        kv_tokens_per_rank(preset_config("llama3-70b"), H100, 1, 2)
    with pytest.raises(CspsError, match="needs more KV"):
        simulate(_specs(prompt_len=4_000_000, output_len=1), Strategy("one"), LLAMA3_8B, H100)
    with pytest.raises(CspsError, match="decode"):
        Strategy("bad", decode="teleport")
    with pytest.raises(CspsError, match="multiple"):
        standard_strategies(8, tp=3)


def test_cli_simulate_prints_strategies_side_by_side(tmp_path, capsys):
    from csps.cli import main

    out = tmp_path / "sim.json"
    plot = tmp_path / "sim.png"
    code = main(["bench", "--simulate", "--hardware", "h100", "--gpus", "8", "--model", "dummy:llama3-8b",
                 "--prompt-len", "32k", "--output-len", "4", "--no-progress", "--json", str(out), "--plot", str(plot)])
    assert code == 0
    text = capsys.readouterr().out
    for name in ("sarathi-tp8", "csps-sp8-passkv", "csps-sp8-kv-decode", "ulysses-sp8"):
        assert name in text
    doc = json.loads(out.read_text())
    assert set(doc["results"]) == {s.name for s in standard_strategies(8)}
    assert doc["config"]["hardware"]["name"] == "h100" and doc["git"]["revision"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
