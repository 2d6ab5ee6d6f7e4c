"""`csps bench serve --find-capacity` against a live `csps serve --model dummy:tiny` (started here on a free
port): the highest Poisson request rate with p99 TBT <= 50 ms and median queueing <= 2 s, for 256-token
prompts and 32 output tokens, each trial offering load for at least 15 s. Writes
benchmarks/results/serve_capacity_tiny.{txt,json}.

    .venv/bin/python benchmarks/bench_serve_capacity.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_run import run_csps, wait_for_quiet  # noqa: E402

if __name__ == "__main__":
    from csps.server.testing import ServerProcess

    wait_for_quiet()
    with ServerProcess(["--model", "dummy:tiny", "--max-model-len", "2048"], timeout_s=300) as srv:
        sys.exit(run_csps("serve_capacity_tiny", [
            "bench", "serve", "--base-url", srv.url, "--num-prompts", "20", "--prompt-len", "256",
            "--output-len", "32", "--request-rate", "4", "--slo", "ttft=2s tbt=50ms", "--find-capacity",
            "--capacity-steps", "2", "--capacity-duration", "15s"], quiet=False))
