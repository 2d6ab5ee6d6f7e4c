"""Issue 16 on the real engine: a 6k-token prompt arriving among 8 decoding requests, prefill chunks sized to the
step time budget (auto) vs the token budget alone, and prefill-first, each on the workload, on the same requests
without the long prompt, and on the long prompt alone (9 runs, one engine config, the same requests). SmolLM2-135M
in the dtype `auto` picks (bf16 on AMX / AVX-512 BF16 CPUs, fp32 elsewhere), token budget 512 (auto), seed 3.
Writes benchmarks/results/chunking_smollm2.{txt,json,png} and chunking_smollm2_tbt.png (TBT over time).

    .venv/bin/python benchmarks/bench_chunking.py            # ~10 min on 2 quiet cores in fp32 (plus waits)
    = csps bench --model smollm2 --prompt-len 256 --output-len 96 --num-prompts 8 --request-rate inf \\
        --long-prompt-len 6k --long-output-len 8 --long-arrival 3s --seed 3 --compare-chunking --compare-policies \\
        --long-baselines --wait-quiet 10m --plot ... --plot-tbt ...
    .venv/bin/python benchmarks/bench_chunking.py --quick    # ~2 min: 4 x 64-token prompts, a 1k prompt, no waits;
                                                             # checks the script, numbers not for quoting

Each run waits (--wait-quiet 10m) for 2 s in a row in which other processes use under 0.3 of a core, and the
script first waits for a 1-minute load average below 0.8: this machine is shared.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_run import run_csps  # noqa: E402

COMPARE = ["--compare-chunking", "--compare-policies", "--long-baselines"]
ARGS = ["bench", "--model", "smollm2", "--prompt-len", "256", "--output-len", "96", "--num-prompts", "8",
        "--request-rate", "inf", "--long-prompt-len", "6k", "--long-output-len", "8", "--long-arrival", "3s",
        "--seed", "3", *COMPARE, "--wait-quiet", "10m"]
QUICK = ["bench", "--model", "smollm2", "--prompt-len", "64", "--output-len", "16", "--num-prompts", "4",
         "--request-rate", "inf", "--long-prompt-len", "1k", "--long-output-len", "4", "--long-arrival", "1s",
         "--seed", "3", *COMPARE]

if __name__ == "__main__":
    if "--quick" in sys.argv[1:]:
        sys.exit(run_csps("chunking_smollm2_quick", QUICK, plot=True, quiet=False, plot_tbt=True))
    sys.exit(run_csps("chunking_smollm2", ARGS, plot=True, plot_tbt=True))
