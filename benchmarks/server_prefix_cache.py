"""Coding-assistant TTFT through the HTTP API: a ~6k-token repository context (CPython stdlib source)
asked about twice. The first request of each pair starts with a fresh nonce (no prefix-cache hit);
the second repeats the context with another question (hit). Pairs alternate in one run, so both
columns see the same machine load. TTFT is measured by the client: request sent to first token.

    python benchmarks/server_prefix_cache.py                      # starts csps serve --model smollm2
    python benchmarks/server_prefix_cache.py --url http://127.0.0.1:8000 --pairs 5
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
import time
import uuid

import httpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import median, save, table  # noqa: E402
from csps.server.testing import ServerProcess  # noqa: E402

STDLIB_FILES = ("textwrap.py", "bisect.py", "heapq.py", "fnmatch.py", "shlex.py", "graphlib.py", "colorsys.py",
                "queue.py", "sched.py", "keyword.py", "glob.py", "copy.py", "reprlib.py", "string.py", "tabnanny.py")
QUESTIONS = ("Which function in textwrap.py removes common leading whitespace, and how does it work?",
             "Explain what heapq.heappushpop does and why it is faster than a push followed by a pop.")


def code_context(http: httpx.Client, num_tokens: int) -> tuple[str, list[str]]:
    """Concatenated stdlib files, cut to exactly ``num_tokens`` tokens of the served model."""
    lib = sysconfig.get_paths()["stdlib"]
    parts, used = [], []
    for name in STDLIB_FILES:
        with open(os.path.join(lib, name), encoding="utf-8") as f:
            parts.append(f"# ===== Lib/{name} =====\n{f.read()}\n")
        used.append(name)
        tokens = http.post("/tokenize", json={"prompt": "".join(parts)}).json()["tokens"]
        if len(tokens) >= num_tokens:
            text = http.post("/detokenize", json={"tokens": tokens[:num_tokens]}).json()["prompt"]
            return text, used
    raise SystemExit(f"the stdlib files listed give fewer than {num_tokens} tokens")


def ask(http: httpx.Client, model: str, system: str, question: str, max_tokens: int) -> dict:
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}]}
    t0 = time.perf_counter()
    ttft, usage, text = None, None, []
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            r.read()
            raise SystemExit(f"HTTP {r.status_code}: {r.text}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            for c in obj["choices"]:
                if ttft is None and ("content" in c["delta"] and c["delta"]["content"] or c["finish_reason"]):
                    ttft = time.perf_counter() - t0
                text.append(c["delta"].get("content") or "")
            if obj.get("usage"):
                usage = obj["usage"]
    return {"ttft_s": ttft, "e2e_s": time.perf_counter() - t0, "prompt_tokens": usage["prompt_tokens"],
            "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"],
            "completion_tokens": usage["completion_tokens"], "text": "".join(text)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", help="a running csps server (default: start one)")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--max-model-len", default="8192")
    ap.add_argument("--context-tokens", type=int, default=6000)
    ap.add_argument("--pairs", type=int, default=3, help="(miss, hit) pairs, alternating")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--name", default="server_prefix_cache", help="results file name (benchmarks/results/)")
    a = ap.parse_args()

    server = None
    if a.url is None:
        server = ServerProcess(["--model", a.model, "--max-model-len", a.max_model_len], timeout_s=1800).start()
    url = a.url or server.url
    try:
        with httpx.Client(base_url=url, timeout=3600) as http:
            served = http.get("/v1/models").json()["data"][0]["id"]
            engine = http.get("/stats").json()["engine"]
            context, files = code_context(http, a.context_tokens)
            rows, pairs = [], []
            for k in range(a.pairs):
                system = (f"[session {uuid.uuid4().hex}] You are a coding assistant. Answer questions about "
                          f"this repository:\n\n{context}")
                miss = ask(http, served, system, QUESTIONS[0], a.max_tokens)
                hit = ask(http, served, system, QUESTIONS[1], a.max_tokens)
                pairs.append({"miss": miss, "hit": hit})
                rows.append((k, miss["prompt_tokens"], f"{miss['ttft_s']:.2f}", miss["cached_tokens"],
                             f"{hit['ttft_s']:.2f}", hit["cached_tokens"], f"{miss['ttft_s'] / hit['ttft_s']:.1f}x"))
                print(table(rows[-1:], ("pair", "prompt tokens", "TTFT miss s", "cached", "TTFT hit s", "cached",
                                        "speedup")).splitlines()[-1], flush=True)
            med_miss = median([p["miss"]["ttft_s"] for p in pairs])
            med_hit = median([p["hit"]["ttft_s"] for p in pairs])
            summary = {"median_ttft_miss_s": med_miss, "median_ttft_hit_s": med_hit,
                       "speedup_median": med_miss / med_hit}
            rows.append(("median", "", f"{med_miss:.2f}", "", f"{med_hit:.2f}", "", f"{med_miss / med_hit:.1f}x"))
            print()
            print(table(rows, ("pair", "prompt tokens", "TTFT miss s", "cached", "TTFT hit s", "cached", "speedup")))
            path = save(a.name, {"config": {"url": url, "model": served, "engine": engine,
                                            "context_tokens": a.context_tokens, "stdlib_files": files,
                                            "pairs": a.pairs, "max_tokens": a.max_tokens},
                                 "summary": summary, "pairs": pairs})
            print(f"\nwrote {path}")
    finally:
        if server is not None:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
