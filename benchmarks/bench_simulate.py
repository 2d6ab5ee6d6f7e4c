"""The 256k-token prompt on 8 simulated H100s (NVLink), strategies side by side, Llama-3-8B in bf16, token
budget 512 per rank; the same on 16 H100s (2 nodes, InfiniBand between them; SP16 and SP2 x TP8); and the long-prompt-among-decodes mix of bench_policies.py scaled to one H100 (32
decodes, a 32k prompt arriving 1 s in), stall-free vs prefill-first. Writes
benchmarks/results/simulate_*.{txt,json}. No waiting: simulated numbers do not depend on the machine's load.

    .venv/bin/python benchmarks/bench_simulate.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_run import run_csps  # noqa: E402

RUNS = {
    "simulate_256k_h100x8": ["bench", "--simulate", "--hardware", "h100", "--gpus", "8", "--model",
                             "dummy:llama3-8b", "--prompt-len", "256k", "--output-len", "64"],
    "simulate_256k_h100x16": ["bench", "--simulate", "--hardware", "h100", "--gpus", "16", "--model",
                              "dummy:llama3-8b", "--prompt-len", "256k", "--output-len", "64"],
    "simulate_256k_h100x16_tp8": ["bench", "--simulate", "--hardware", "h100", "--gpus", "16", "--tp", "8",
                                  "--model", "dummy:llama3-8b", "--prompt-len", "256k", "--output-len", "64"],
    "simulate_policies_h100": ["bench", "--simulate", "--hardware", "h100", "--gpus", "1", "--model",
                               "dummy:llama3-8b", "--num-prompts", "32", "--prompt-len", "1k", "--output-len", "64",
                               "--long-prompt-len", "32k", "--long-output-len", "4", "--long-arrival", "1s",
                               "--token-budget", "512", "--compare-policies"],
}

if __name__ == "__main__":
    sys.exit(max(run_csps(name, args, quiet=False) for name, args in RUNS.items()))
