"""Sequence-parallel benchmarks (issue: sequence parallelism), each side by side in one run.

  ttft      TTFT of a 16k-token prompt (a book) at SP 1 vs SP 2 (goal on 2 cores: SP 2 <= 1.15x SP 1)
  decode    bytes moved per decode token at 4k/16k/64k context: pass-Q (measured) vs moving the KV
  exchange  ring (pass-KV) vs pass-Q vs Ulysses for one long prompt: time and bytes
  memory    peak KV memory per rank for a long prompt at SP 1/2/4 (should fall ~1/P)

Run: .venv/bin/python benchmarks/sp_bench.py [ttft decode exchange memory] [--ttft-len 16k]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import BOOKS, save, table  # noqa: E402

from csps.cli_args import parse_len  # noqa: E402
from csps.core.sampling_params import SamplingParams  # noqa: E402
from csps.llm import create_engine, make_engine_config  # noqa: E402

ONE = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)


def book_tokens(tok, n: int) -> list[int]:
    with open(os.path.join(BOOKS, "pride_and_prejudice.txt")) as f:
        ids = tok.encode(f.read()[: n * 6])
    return ids[:n]


def run_one(model: str, prompt: list[int], params=ONE, **kw) -> dict:
    """Run one request to completion; TTFT, bytes by kind, KV blocks used per rank (peak)."""
    cfg = make_engine_config(model=model, **kw)
    engine = create_engine(cfg, max_model_len=kw.get("max_model_len"))
    try:
        engine.add_request(prompt, params)
        out = None
        while engine.has_unfinished():
            for o in engine.step():
                out = o
        peak = engine.stats()["kv_blocks_peak"]  # high-water mark per rank (the last chunk included)
        nbytes: dict[str, int] = {}
        for rec in engine.step_log:
            for k, v in rec.bytes_by_kind.items():
                nbytes[k] = nbytes.get(k, 0) + v
        block_bytes = engine.cache.bytes // engine.cache.num_blocks
        decode_steps = [r.bytes_by_kind for r in engine.step_log if r.num_decode_tokens and not r.num_prefill_tokens]
        return {"ttft_s": out.metrics.ttft_s, "bytes": nbytes, "peak_kv_blocks_per_rank": peak,
                "peak_kv_bytes_per_rank": [b * block_bytes for b in peak],
                "decode_step_bytes": decode_steps[-1] if decode_steps else {},
                "steps": len(engine.step_log)}
    finally:
        engine.shutdown()


def bench_ttft(n: int) -> dict:
    from csps.engine.tokenizer import Tokenizer, load_tokenizer

    tok = Tokenizer(load_tokenizer("smollm2"))
    prompt = book_tokens(tok, n)
    kw = dict(token_budget=2048, max_model_len=n + 16, enable_prefix_caching=False, sp_threshold_tokens=1024)
    res = {}
    for sp in (1, 2):
        t0 = time.perf_counter()
        r = run_one("smollm2", prompt, sp=sp, **kw)
        r["wall_s"] = time.perf_counter() - t0
        res[f"sp{sp}"] = r
        print(f"ttft sp={sp}: {r['ttft_s']:.1f} s", flush=True)
    res["ratio_sp2_over_sp1"] = res["sp2"]["ttft_s"] / res["sp1"]["ttft_s"]
    res["prompt_tokens"] = n
    return res


def bench_decode() -> dict:
    from csps.presets import preset_config

    m = preset_config("tiny")
    out = {}
    for n in (4096, 16384, 65536):
        prompt = [5 + i % 40000 for i in range(n)]
        r = run_one("dummy:tiny", prompt, SamplingParams(max_tokens=3, ignore_eos=True), sp=2, dtype="float32",
                    token_budget=4096, max_model_len=n + 16, enable_prefix_caching=False, sp_threshold_tokens=1024)
        d = r["decode_step_bytes"]
        pass_q = d.get("pass_q", 0) + d.get("pass_q_out", 0)
        # moving the KV instead: the half of the context held by the other rank, K and V, every layer
        move_kv = (n // 2) * m.kv_bytes_per_token(4)
        out[n] = {"pass_q_bytes_per_token": pass_q, "move_kv_bytes_per_token": move_kv,
                  "ratio": move_kv / pass_q if pass_q else None}
        print(f"decode bytes at {n}: pass-Q {pass_q} vs KV {move_kv}", flush=True)
    return out


def bench_exchange(n: int) -> dict:
    from csps.engine.tokenizer import Tokenizer, load_tokenizer

    tok = Tokenizer(load_tokenizer("smollm2"))
    prompt = book_tokens(tok, n)
    kw = dict(token_budget=1024, max_model_len=n + 16, enable_prefix_caching=False, sp_threshold_tokens=512, sp=2)
    out = {}
    for name, extra in [("ring_pass_kv", dict(sp_exchange="pass_kv")), ("pass_q", dict(sp_exchange="pass_q")),
                        ("ulysses", dict(sp_attn="ulysses"))]:
        r = run_one("smollm2", prompt, **kw, **extra)
        moved = {k: v for k, v in r["bytes"].items() if k not in ("plan", "sample", "stats")}
        out[name] = {"ttft_s": r["ttft_s"], "bytes": moved, "total_bytes": sum(moved.values())}
        print(name, out[name], flush=True)
    out["prompt_tokens"] = n
    return out


def bench_memory(n: int) -> dict:
    out = {}
    prompt = [5 + i % 40000 for i in range(n)]
    for sp in (1, 2, 4):
        r = run_one("dummy:tiny", prompt, sp=sp, dtype="float32", token_budget=4096, max_model_len=n + 16,
                    enable_prefix_caching=False, sp_threshold_tokens=1024)
        out[f"sp{sp}"] = {"peak_kv_bytes_per_rank": r["peak_kv_bytes_per_rank"], "ttft_s": r["ttft_s"]}
        print(sp, out[f"sp{sp}"], flush=True)
    out["prompt_tokens"] = n
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("parts", nargs="*", default=["ttft", "decode", "exchange", "memory"])
    ap.add_argument("--ttft-len", type=parse_len, default=16384)
    ap.add_argument("--exchange-len", type=parse_len, default=4096)
    ap.add_argument("--memory-len", type=parse_len, default=65536)
    args = ap.parse_args()
    res = {}
    if "decode" in args.parts:
        res["decode"] = bench_decode()
    if "memory" in args.parts:
        res["memory"] = bench_memory(args.memory_len)
    if "exchange" in args.parts:
        res["exchange"] = bench_exchange(args.exchange_len)
    if "ttft" in args.parts:
        res["ttft"] = bench_ttft(args.ttft_len)
    print("wrote", save("sp_" + "_".join(args.parts), res))
    if "ttft" in res:
        t = res["ttft"]
        print(table([(t["prompt_tokens"], f"{t['sp1']['ttft_s']:.1f}", f"{t['sp2']['ttft_s']:.1f}",
                      f"{t['ratio_sp2_over_sp1']:.2f}")], ("prompt tokens", "SP 1 TTFT s", "SP 2 TTFT s", "SP2/SP1")))
    if "decode" in res:
        print(table([(n, v["pass_q_bytes_per_token"], v["move_kv_bytes_per_token"], f"{v['ratio']:.0f}x")
                     for n, v in res["decode"].items()], ("context", "pass-Q B/token", "move-KV B/token", "KV/Q")))
    if "exchange" in res:
        print(table([(k, f"{v['ttft_s']:.1f}", v["total_bytes"]) for k, v in res["exchange"].items()
                     if isinstance(v, dict)], ("exchange", "TTFT s", "bytes moved")))
    if "memory" in res:
        print(table([(k, [f"{b / 2**20:.1f}" for b in v["peak_kv_bytes_per_rank"]]) for k, v in res["memory"].items()
                     if isinstance(v, dict)], ("layout", "peak KV MiB per rank")))


if __name__ == "__main__":
    main()
