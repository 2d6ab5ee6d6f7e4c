"""The acceptance run: `csps bench --prompt-len 256k --model dummy:tiny` on this machine (one 262,144-token
prompt, 64 output tokens, fp32; the token budget is chosen automatically). Writes
benchmarks/results/real_256k_tiny.{txt,json,png}.

    .venv/bin/python benchmarks/bench_256k.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_run import run_csps  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_csps("real_256k_tiny", ["bench", "--prompt-len", "256k", "--model", "dummy:tiny",
                                        "--wait-quiet", "10m"], plot=True))
