"""Issue 16 in simulation: a 256k-token prompt arriving among 64 decoding requests on 8 H100s (Llama-3-8B, bf16,
published H100-SXM specifications, NVLink), prefill chunks sized to the step time budget (auto: the decodes plus
one fresh 512-token chunk) vs the token budget alone (512 per rank), for Sarathi-Serve's TP8 and csps' SP8 layouts,
then SP4 x TP2. Each on the workload, on the same 64 requests without the long prompt, and on the long prompt alone.
The 64 requests (4k-token prompts, 2k output tokens) arrive together; the long prompt arrives at 4 s, when all 64
are decoding, and its prefill overlaps their decodes to the end. Writes benchmarks/results/
simulate_chunking_h100x8{,_tp2}.{txt,json} and _tbt.png (TBT over time). Simulated numbers do not depend on the
machine's load: no waiting.

    .venv/bin/python benchmarks/bench_simulate_chunking.py   # ~4 min (pure Python, one core)
    = csps bench --simulate --hardware h100 --gpus 8 --model dummy:llama3-8b --num-prompts 64 --prompt-len 4k \\
        --output-len 2k --long-prompt-len 256k --long-output-len 16 --long-arrival 4s --compare-chunking \\
        --long-baselines --plot-tbt ...        (and the same with --tp 2 --strategies csps,ulysses)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_run import run_csps  # noqa: E402

WORKLOAD = ["--model", "dummy:llama3-8b", "--num-prompts", "64", "--prompt-len", "4k", "--output-len", "2k",
            "--long-prompt-len", "256k", "--long-output-len", "16", "--long-arrival", "4s",
            "--compare-chunking", "--long-baselines"]
RUNS = {
    "simulate_chunking_h100x8": ["bench", "--simulate", "--hardware", "h100", "--gpus", "8", *WORKLOAD],
    "simulate_chunking_h100x8_tp2": ["bench", "--simulate", "--hardware", "h100", "--gpus", "8", "--tp", "2",
                                     "--strategies", "csps,ulysses", *WORKLOAD],
}

if __name__ == "__main__":
    sys.exit(max(run_csps(name, args, quiet=False, plot_tbt=True) for name, args in RUNS.items()))
