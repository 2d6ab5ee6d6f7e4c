"""Code-completion TTFT through llama.cpp's /infill: a ~6k-token repository context (CPython stdlib files as
``input_extra``) completed at a cursor, cold and repeated. The first request of each pair starts its context
with a fresh nonce (no prefix-cache hit); the second sends the same files with the cursor elsewhere (what an
editor plugin sends on the next keystroke). Pairs alternate in one run, so both columns see the same machine
load. TTFT is measured by the client: request sent to the first streamed token.

    python benchmarks/server_infill.py            # starts csps serve --model smollm2 --fim-template starcoder
    python benchmarks/server_infill.py --url http://127.0.0.1:8000 --pairs 5
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
                "queue.py", "sched.py", "keyword.py", "glob.py", "copy.py", "reprlib.py", "string.py")
CURSORS = (("def dedent_all(texts):\n    return [", "]\n"),
           ("def smallest(items, k):\n    return heapq.", "\n"))


def repository(http: httpx.Client, num_tokens: int) -> list[dict]:
    """stdlib files as input_extra chunks, the last one cut so the files hold ``num_tokens`` tokens."""
    lib = sysconfig.get_paths()["stdlib"]
    files, total = [], 0
    for name in STDLIB_FILES:
        with open(os.path.join(lib, name), encoding="utf-8") as f:
            text = f.read()
        tokens = http.post("/tokenize", json={"prompt": text}).json()["tokens"]
        if total + len(tokens) >= num_tokens:
            cut = http.post("/detokenize", json={"tokens": tokens[: num_tokens - total]}).json()["prompt"]
            files.append({"filename": f"Lib/{name}", "text": cut})
            return files
        files.append({"filename": f"Lib/{name}", "text": text})
        total += len(tokens)
    raise SystemExit(f"the stdlib files listed give fewer than {num_tokens} tokens")


def infill(http: httpx.Client, extra: list[dict], cursor: tuple[str, str], n_predict: int) -> dict:
    body = {"input_extra": extra, "input_prefix": cursor[0], "input_suffix": cursor[1], "n_predict": n_predict,
            "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    ttft, final, text = None, None, []
    with http.stream("POST", "/infill", json=body) as r:
        if r.status_code != 200:
            r.read()
            raise SystemExit(f"HTTP {r.status_code}: {r.text}")
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue  # ': keepalive' comments
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise SystemExit(f"error: {chunk['error']}")
            if ttft is None and (chunk["tokens"] or chunk["stop"]):
                ttft = time.perf_counter() - t0
            text.append(chunk["content"])
            if chunk["stop"]:
                final = chunk
    t = final["timings"]
    return {"ttft_s": ttft, "e2e_s": time.perf_counter() - t0, "prompt_tokens": final["tokens_evaluated"],
            "cached_tokens": final["tokens_cached"], "server_prompt_ms": t["prompt_ms"], "prompt_n": t["prompt_n"],
            "predicted_n": t["predicted_n"], "text": "".join(text)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", help="a running csps server (default: start one)")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--fim-template", default="starcoder", help="for the server this script starts (SmolLM2 "
                                                                 "has no FIM tokens)")
    ap.add_argument("--max-model-len", default="8192")
    ap.add_argument("--context-tokens", type=int, default=6000)
    ap.add_argument("--pairs", type=int, default=3, help="(cold, repeated) pairs, alternating")
    ap.add_argument("--n-predict", type=int, default=8)
    ap.add_argument("--name", default="server_infill", help="results file name (benchmarks/results/)")
    a = ap.parse_args()

    server = None
    if a.url is None:
        server = ServerProcess(["--model", a.model, "--max-model-len", a.max_model_len, "--fim-template",
                                a.fim_template], timeout_s=1800).start()
    url = a.url or server.url
    header = ("pair", "prompt tokens", "TTFT cold s", "cached", "TTFT repeated s", "cached", "speedup")
    try:
        with httpx.Client(base_url=url, timeout=3600) as http:
            engine = http.get("/stats").json()["engine"]
            files = repository(http, a.context_tokens)
            rows, pairs = [], []
            for k in range(a.pairs):
                nonce = {"filename": "SESSION", "text": f"# session {uuid.uuid4().hex}\n"}
                extra = [nonce, *files]
                cold = infill(http, extra, CURSORS[0], a.n_predict)
                hit = infill(http, extra, CURSORS[1], a.n_predict)
                pairs.append({"cold": cold, "repeated": hit})
                rows.append((k, cold["prompt_tokens"], f"{cold['ttft_s']:.2f}", cold["cached_tokens"],
                             f"{hit['ttft_s']:.2f}", hit["cached_tokens"], f"{cold['ttft_s'] / hit['ttft_s']:.1f}x"))
                print(table(rows[-1:], header).splitlines()[-1], flush=True)
            med_cold = median([p["cold"]["ttft_s"] for p in pairs])
            med_hit = median([p["repeated"]["ttft_s"] for p in pairs])
            summary = {"median_ttft_cold_s": med_cold, "median_ttft_repeated_s": med_hit,
                       "speedup_median": med_cold / med_hit}
            rows.append(("median", "", f"{med_cold:.2f}", "", f"{med_hit:.2f}", "", f"{med_cold / med_hit:.1f}x"))
            print()
            print(table(rows, header))
            path = save(a.name, {"config": {"url": url, "engine": engine, "context_tokens": a.context_tokens,
                                            "files": [f["filename"] for f in files], "pairs": a.pairs,
                                            "n_predict": a.n_predict, "cursors": CURSORS},
                                 "summary": summary, "pairs": pairs})
            print(f"\nwrote {path}")
    finally:
        if server is not None:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
