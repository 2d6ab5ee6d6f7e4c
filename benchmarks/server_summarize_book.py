"""Summarize a book end to end through the HTTP API (POST /v1/summarize, streamed) with the default
model, recording wall time, token counts, the strategy and each map-reduce level's progress.

    python benchmarks/server_summarize_book.py                            # persuasion.txt, smollm2
    python benchmarks/server_summarize_book.py --book pride_and_prejudice.txt --time-limit 3600
    python benchmarks/server_summarize_book.py --max-chars 60000          # the book's first 60k characters

With ``--time-limit`` the request is cancelled when the time is up (the server aborts its engine
requests); the JSON then says ``completed: false`` and keeps the progress reached, with an estimate
of the full run from the pace of the finished chunks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import BOOKS, save  # noqa: E402
from csps.server.testing import ServerProcess  # noqa: E402


def engine_tokens(url: str) -> dict[str, float]:
    """Prefill and decode tokens the engine has computed so far (from /metrics)."""
    out = {"prefill": 0.0, "decode": 0.0}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=60).text):
        for s in fam.samples:
            if s.name == "csps_engine_step_tokens_total":
                out[s.labels["kind"]] = s.value
    return out


def run(url: str, text: str, a: argparse.Namespace) -> dict:
    body = {"text": text, "stream": True, "max_tokens": a.max_tokens, "temperature": 0.0}
    if a.chunk_tokens:
        body["chunk_tokens"] = a.chunk_tokens
    tokens0 = engine_tokens(url)
    t0 = time.perf_counter()
    deadline = t0 + a.time_limit
    events, result, plan, completed, error = [], None, None, False, None
    try:
        with httpx.Client(base_url=url, timeout=httpx.Timeout(60.0, read=a.time_limit)) as http:
            with http.stream("POST", "/v1/summarize", json=body) as r:
                if r.status_code != 200:
                    r.read()
                    raise SystemExit(f"HTTP {r.status_code}: {r.text}")
                for line in r.iter_lines():
                    now = time.perf_counter() - t0
                    if line == "data: [DONE]":
                        completed = result is not None
                        break
                    if not line.startswith("data: "):
                        continue
                    obj = json.loads(line[6:])
                    kind = obj.get("object")
                    if "error" in obj:
                        error = obj["error"]["message"]
                        print(f"[{now:7.1f} s] the server failed: {error}", flush=True)
                        break
                    if kind == "summary.plan":
                        plan = obj
                        print(f"[{now:7.1f} s] plan: {obj['strategy']}, {obj['document_tokens']} document tokens, "
                              f"context {obj['max_model_len']}", flush=True)
                    elif kind == "summary.progress":
                        events.append({"t_s": now, **obj})
                        print(f"[{now:7.1f} s] level {obj['level']}: {obj['chunks_done']}/{obj['chunks_total']} chunks",
                              flush=True)
                    elif kind == "summary":
                        result = obj
                    if time.perf_counter() > deadline:
                        print(f"time limit ({a.time_limit:.0f} s) reached: cancelling", flush=True)
                        break
    except httpx.ReadTimeout:
        print(f"no event for {a.time_limit:.0f} s: cancelling", flush=True)
    wall_s = time.perf_counter() - t0
    tokens1 = engine_tokens(url)
    computed = {k: tokens1[k] - tokens0[k] for k in tokens0}
    out = {"completed": completed, "error": error, "wall_s": wall_s, "plan": plan, "progress": events, "result": result,
           "engine_tokens_computed": computed, "prefill_tokens_per_s": computed["prefill"] / wall_s}
    if not completed and plan is not None and computed["prefill"]:
        # lower bound: the map level's prefill alone, at the pace measured so far
        out["estimate_map_prefill_s"] = plan["document_tokens"] / out["prefill_tokens_per_s"]
    if not completed and events:
        level1 = [e for e in events if e["level"] == 1]
        if level1:
            last = level1[-1]
            per_chunk_s = last["t_s"] / last["chunks_done"]
            out["estimate_level1_s"] = per_chunk_s * last["chunks_total"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--book", default="persuasion.txt", help=f"a file in {BOOKS}, or a path")
    ap.add_argument("--url", help="a running csps server (default: start one)")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--max-model-len", default="8192")
    ap.add_argument("--max-tokens", type=int, default=512, help="length of the final summary")
    ap.add_argument("--chunk-tokens", type=int, default=None, help="map-reduce chunk size (default: the context)")
    ap.add_argument("--max-chars", type=int, default=None, help="summarize only the book's first N characters")
    ap.add_argument("--time-limit", type=float, default=900.0, help="seconds before the request is cancelled")
    ap.add_argument("--name", default="server_summarize_book")
    a = ap.parse_args()

    path = a.book if os.path.exists(a.book) else os.path.join(BOOKS, a.book)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if a.max_chars:
        text = text[: a.max_chars]
    server = None
    if a.url is None:
        server = ServerProcess(["--model", a.model, "--max-model-len", a.max_model_len], timeout_s=1800).start()
    try:
        url = a.url or server.url
        engine = httpx.get(url + "/stats", timeout=60).json()["engine"]
        out = run(url, text, a)
        res = out["result"]
        if res is not None:
            u, t = res["usage"], res["timings"]
            print(f"\n{res['strategy']}: {res['document_tokens']} document tokens, {res['num_levels']} levels, "
                  f"{res['num_requests']} requests, {u['prompt_tokens']} prompt + {u['completion_tokens']} generated "
                  f"tokens, wall {out['wall_s']:.1f} s (final pass {t['final_s']:.1f} s)\n\n{res['summary']}\n")
        else:
            print(f"\nnot completed within {a.time_limit:.0f} s: {out['engine_tokens_computed']} tokens computed "
                  f"({out['prefill_tokens_per_s']:.0f} prefill tokens/s); the map level's prefill alone would take "
                  f"~{out.get('estimate_map_prefill_s', float('nan')):.0f} s")
        saved = save(a.name, {"config": {"book": os.path.basename(path), "chars": len(text), "model": a.model,
                                         "engine": engine, "max_tokens": a.max_tokens,
                                         "chunk_tokens": a.chunk_tokens, "time_limit_s": a.time_limit}, **out})
        print(f"wrote {saved}")
    finally:
        if server is not None:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
