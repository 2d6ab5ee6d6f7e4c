"""Shared helpers for the benchmark scripts: side-by-side timing and JSON with provenance."""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

from csps.bench.report import git_revision
from csps.bench.workloads import default_books_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
BOOKS = str(default_books_dir())


def provenance() -> dict:
    import torch

    from csps.perf.hardware import machine_info

    git = git_revision()
    return {"git": (git["revision"] or "unknown")[:7], "git_dirty": git["dirty"], "uncommitted": git.get("uncommitted"),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": machine_info(), "command": " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median(xs) -> float:
    return statistics.median(xs)


def save(name: str, data: dict) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}.json")
    prov = provenance()  # before the file is opened: a truncated results file would mark the tree dirty
    with open(path, "w") as f:
        json.dump({"provenance": prov, **data}, f, indent=1)
    return path


def table(rows: list[tuple], header: tuple) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)
