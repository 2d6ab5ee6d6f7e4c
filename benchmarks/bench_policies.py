"""Stall-free vs prefill-first on the real engine, side by side in one run (csps bench --compare-policies).

Workload: 8 requests decoding (64-token prompts, 64 tokens each) when one 4k-token prompt arrives 3 s
in. SmolLM2-135M in fp32 on this CPU. Writes benchmarks/results/policies_smollm2.{txt,json,png}.

    .venv/bin/python benchmarks/bench_policies.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_run import run_csps  # noqa: E402

ARGS = ["bench", "--model", "smollm2", "--dtype", "float32", "--num-prompts", "8", "--prompt-len", "64",
        "--output-len", "64", "--long-prompt-len", "4k", "--long-output-len", "8", "--long-arrival", "3s",
        "--token-budget", "512", "--compare-policies", "--wait-quiet", "10m"]

if __name__ == "__main__":
    sys.exit(run_csps("policies_smollm2", ARGS, plot=True))
