"""Shared by the bench_*.py scripts: wait until other jobs leave the CPU, run one `csps` command, keep
its output under benchmarks/results/<name>.{txt,json[,png]}."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def wait_for_quiet(max_load: float = 0.8, max_wait_s: float = 1800.0) -> float:
    """Wait (up to max_wait_s) until the 1-minute load average drops below max_load; returns it."""
    deadline = time.monotonic() + max_wait_s
    while (load := os.getloadavg()[0]) >= max_load and time.monotonic() < deadline:
        time.sleep(15)
    return load


def run_csps(name: str, args: list[str], plot: bool = False, quiet: bool = True, plot_tbt: bool = False) -> int:
    RESULTS.mkdir(parents=True, exist_ok=True)
    args = list(args) + ["--json", str(RESULTS / f"{name}.json"), "--no-progress"]
    if plot:
        args += ["--plot", str(RESULTS / f"{name}.png")]
    if plot_tbt:
        args += ["--plot-tbt", str(RESULTS / f"{name}_tbt.png")]
    load = wait_for_quiet() if quiet else os.getloadavg()[0]
    cmd = [sys.executable, "-m", "csps.cli", *args]
    header = f"$ csps {' '.join(args)}\n# load average before the run: {load:.2f}\n"
    print(header, end="", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    footer = f"# wall time {time.perf_counter() - t0:.0f} s, exit code {proc.returncode}\n"
    (RESULTS / f"{name}.txt").write_text(header + proc.stdout + footer)
    print(proc.stdout + footer, end="")
    if proc.returncode:
        print(proc.stderr[-4000:], file=sys.stderr)
    return proc.returncode
