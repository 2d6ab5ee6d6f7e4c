"""The cost model against this machine (csps bench --validate): dummy:tiny over prompt lengths 1k-16k, and
SmolLM2-135M over 1k-4k (16k would take ~10 min in fp32 here), SP 1 and 2, decode batches 1, 8, 32.
Writes benchmarks/results/validate_{tiny,smollm2}.{txt,json}.

    .venv/bin/python benchmarks/bench_validate.py [tiny|smollm2]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_run import run_csps  # noqa: E402

RUNS = {
    "tiny": ["bench", "--validate", "--model", "dummy:tiny", "--validate-lengths", "1k,2k,4k,8k,16k",
             "--validate-batches", "1,8,32", "--wait-quiet", "10m"],
    "smollm2": ["bench", "--validate", "--model", "smollm2", "--dtype", "float32", "--validate-lengths",
                "1k,2k,4k", "--validate-batches", "1,8,32", "--wait-quiet", "10m"],
}

if __name__ == "__main__":
    names = sys.argv[1:] or list(RUNS)
    sys.exit(max(run_csps(f"validate_{n}", RUNS[n]) for n in names))
