"""Benchmark results: percentiles, the run summary shared by real and simulated runs, tables, JSON.

Real runs (``csps.bench.run``) and simulated ones (``csps.bench.simulator``) both reduce to per-request samples
(``RequestMetrics``, the single definition of TTFT/TBT/queueing) and per-step samples, and
``summarize_run`` turns those into the same fields, so their tables line up:

* ``ttft_s``, ``tbt_s``, ``queue_s``, ``e2e_s``: distributions (mean, p50, p90, p99, max);
* ``prefill_tokens_per_s``: prefill tokens / busy time of the steps that had prefill tokens;
  ``decode_tokens_per_s`` likewise for decode tokens (a mixed step counts for both);
* ``achieved_flops_per_s``: useful FLOPs (the cost model's count for each step's shape) / busy time;
  ``fraction_of_peak``: that over ``peak_flops_per_s`` (this machine's measured matmul peak, or the
  simulated devices' datasheet peak times their number);
* ``bytes_per_step_by_kind``: mean bytes moved between ranks per step, by kind (pass_kv, pass_q, ...);
* ``peak_kv_bytes_per_rank``: the most KV-cache memory each rank held at the end of any step.
"""

from __future__ import annotations

import datetime
import json
import math
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterable

from csps.core.sampling_params import RequestMetrics

STAT_KEYS = ("mean", "p50", "p90", "p99", "max")


@dataclass(frozen=True)
class StepSample:
    start_s: float
    duration_s: float
    num_prefill_tokens: int
    num_decode_tokens: int
    num_seqs: int
    flops: float = 0.0  # useful FLOPs of the step's shape (cost-model count)
    bytes_by_kind: dict[str, float] = field(default_factory=dict)
    kv_blocks_used: tuple[int, ...] = ()  # per rank, after the step


@dataclass(frozen=True)
class RequestSample:
    prompt_len: int
    num_output_tokens: int
    metrics: RequestMetrics
    tag: str = ""


def percentile(values: Iterable[float], q: float) -> float | None:
    """The q-th percentile (0-100) with linear interpolation (numpy's default); None if empty."""
    xs = sorted(values)
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def distribution(values: Iterable[float]) -> dict[str, float | None]:
    xs = list(values)
    out: dict[str, float | None] = {"mean": sum(xs) / len(xs) if xs else None}
    for key, q in (("p50", 50), ("p90", 90), ("p99", 99)):
        out[key] = percentile(xs, q)
    out["max"] = max(xs) if xs else None
    out["count"] = len(xs)
    return out


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


def summarize_run(requests: list[RequestSample], steps: list[StepSample], *, peak_flops_per_s: float,
                  kv_bytes_per_block: float, num_ranks: int) -> dict:
    """The fields every bench table shows (module docstring), from request and step samples."""
    done = [r for r in requests if r.metrics.ttft_s is not None]
    ttfts = [r.metrics.ttft_s for r in done]
    long_ttft = [r.metrics.ttft_s for r in done if r.tag == "long"]
    busy_s = sum(s.duration_s for s in steps)
    prefill_s = sum(s.duration_s for s in steps if s.num_prefill_tokens)
    decode_s = sum(s.duration_s for s in steps if s.num_decode_tokens)
    prefill_tokens = sum(s.num_prefill_tokens for s in steps)
    decode_tokens = sum(s.num_decode_tokens for s in steps)
    flops = sum(s.flops for s in steps)
    kinds: dict[str, float] = {}
    for s in steps:
        for k, v in s.bytes_by_kind.items():
            kinds[k] = kinds.get(k, 0.0) + v
    peak_blocks = [0] * num_ranks
    for s in steps:
        for r, used in enumerate(s.kv_blocks_used[:num_ranks]):
            peak_blocks[r] = max(peak_blocks[r], used)
    wall_s = (steps[-1].start_s + steps[-1].duration_s - steps[0].start_s) if steps else 0.0
    achieved = _ratio(flops, busy_s)
    return {
        "num_requests": len(requests),
        "num_finished": sum(1 for r in requests if r.metrics.finished_s is not None),
        "num_steps": len(steps),
        "duration_s": wall_s,
        "busy_s": busy_s,
        "ttft_s": distribution(ttfts),
        "long_prompt_ttft_s": long_ttft[0] if long_ttft else None,
        "tbt_s": distribution(t for r in done for t in r.metrics.tbt_s),
        "queue_s": distribution(r.metrics.queue_s for r in requests if r.metrics.queue_s is not None),
        "e2e_s": distribution(r.metrics.e2e_s for r in requests if r.metrics.e2e_s is not None),
        "step_time_s": distribution(s.duration_s for s in steps),
        "max_prefill_tokens_per_step": max((s.num_prefill_tokens for s in steps), default=0),
        "prefill_tokens": prefill_tokens,
        "decode_tokens": decode_tokens,
        "prefill_tokens_per_s": _ratio(prefill_tokens, prefill_s),
        "decode_tokens_per_s": _ratio(decode_tokens, decode_s),
        "total_flops": flops,
        "achieved_flops_per_s": achieved,
        "peak_flops_per_s": peak_flops_per_s,
        "fraction_of_peak": _ratio(achieved, peak_flops_per_s) if achieved is not None else None,
        "bytes_total_by_kind": kinds,
        "bytes_per_step_by_kind": {k: v / len(steps) for k, v in kinds.items()} if steps else {},
        "peak_kv_bytes_per_rank": [b * kv_bytes_per_block for b in peak_blocks],
    }


# --- tables ----------------------------------------------------------------------------------------

def _si(x: float | None, unit: str = "") -> str:
    if x is None:
        return "-"
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}".rstrip()
    return f"{x:.3g} {unit}".rstrip()


def _secs(x: float | None) -> str:
    if x is None:
        return "-"
    if x >= 100:
        return f"{x:.0f} s"
    if x >= 1:
        return f"{x:.2f} s"
    return f"{x * 1e3:.3g} ms"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2g}%"


def _get(d: dict, *path):
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


Row = tuple[str, Callable[[dict], float | None], Callable[[float | None], str]]

ROWS: list[Row] = [
    ("requests finished", lambda s: s["num_finished"], lambda x: "-" if x is None else str(int(x))),
    ("duration", lambda s: s["duration_s"], _secs),
    ("TTFT mean", lambda s: _get(s, "ttft_s", "mean"), _secs),
    ("TTFT p99", lambda s: _get(s, "ttft_s", "p99"), _secs),
    ("TTFT of the long prompt", lambda s: s.get("long_prompt_ttft_s"), _secs),
    ("TBT p50", lambda s: _get(s, "tbt_s", "p50"), _secs),
    ("TBT p90", lambda s: _get(s, "tbt_s", "p90"), _secs),
    ("TBT p99", lambda s: _get(s, "tbt_s", "p99"), _secs),
    ("TBT max", lambda s: _get(s, "tbt_s", "max"), _secs),
    ("queueing p50", lambda s: _get(s, "queue_s", "p50"), _secs),
    ("prefill tokens/s", lambda s: s["prefill_tokens_per_s"], _si),
    ("decode tokens/s", lambda s: s["decode_tokens_per_s"], _si),
    ("achieved FLOP/s", lambda s: s["achieved_flops_per_s"], lambda x: _si(x, "FLOP/s")),
    ("fraction of peak", lambda s: s["fraction_of_peak"], _pct),
    ("steps", lambda s: s["num_steps"], lambda x: "-" if x is None else str(int(x))),
    ("step time max", lambda s: _get(s, "step_time_s", "max"), _secs),
]


def _kind_rows(summaries: dict[str, dict]) -> list[Row]:
    kinds = sorted({k for s in summaries.values() for k in s.get("bytes_per_step_by_kind", {})})
    rows: list[Row] = [(f"bytes/step {k}", (lambda s, k=k: s["bytes_per_step_by_kind"].get(k, 0.0)),
                        lambda x: _si(x, "B")) for k in kinds]
    if not kinds:
        rows.append(("bytes/step between ranks", lambda s: 0.0, lambda x: "0 (one rank)"))
    num_ranks = max((len(s["peak_kv_bytes_per_rank"]) for s in summaries.values()), default=1)
    if num_ranks <= 4:
        rows += [(f"peak KV rank {r}", (lambda s, r=r: s["peak_kv_bytes_per_rank"][r]
                                       if r < len(s["peak_kv_bytes_per_rank"]) else None),
                  lambda x: _si(x, "B")) for r in range(num_ranks)]
    else:
        rows.append(("peak KV per rank (max)", lambda s: max(s["peak_kv_bytes_per_rank"], default=0.0),
                     lambda x: _si(x, "B")))
    return rows


def format_table(summaries: dict[str, dict], ratio_of: tuple[str, str] | None = None) -> str:
    """Metrics as rows, runs as columns; ``ratio_of=(a, b)`` adds a column a/b."""
    names = list(summaries)
    header = ["metric"] + names + (["ratio"] if ratio_of else [])
    lines = [header]
    for label, get, fmt in ROWS + _kind_rows(summaries):
        values = [get(summaries[n]) for n in names]
        if all(v is None for v in values):
            continue
        row = [label] + [fmt(v) for v in values]
        if ratio_of:
            a, b = get(summaries[ratio_of[0]]), get(summaries[ratio_of[1]])
            row.append(f"{a / b:.3g}x" if a is not None and b else "-")
        lines.append(row)
    widths = [max(len(r[i]) for r in lines) for i in range(len(header))]
    out = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
           for r in lines]
    out.insert(1, "-" * len(out[0]))
    if ratio_of:
        out.append(f"ratio = {ratio_of[0]} / {ratio_of[1]}")
    return "\n".join(out)


# --- JSON ------------------------------------------------------------------------------------------

def _repo_dir() -> Path:
    return Path(__file__).resolve().parents[2]  # csps/bench/report.py -> the repository


def git_revision() -> dict:
    def git(*args: str) -> str | None:  # stdout without its last newline (porcelain lines start with a space)
        try:
            r = subprocess.run(["git", "-C", str(_repo_dir()), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return r.stdout.rstrip("\n") if r.returncode == 0 else None

    rev = git("rev-parse", "HEAD")
    status = git("status", "--porcelain")
    if status is None:
        return {"revision": rev, "dirty": None}
    # modified tracked files, or source not yet committed, make the revision an incomplete description
    changed = [line[3:] for line in status.splitlines() if not line.startswith("??") or line.endswith(".py")]
    return {"revision": rev, "dirty": bool(changed), "uncommitted": changed[:50]}


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("csps", "torch", "transformers", "numpy", "httpx"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def document(kind: str, config: dict, results: dict, git: dict | None = None, **extra) -> dict:
    """A self-describing benchmark record: what ran, on what code and machine, and the numbers.
    ``git``: ``git_revision()`` taken when the run started (default: now)."""
    from csps.perf.hardware import machine_info

    return {
        "kind": kind,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": (" ".join(["csps"] + sys.argv[1:]) if Path(sys.argv[0]).name in ("csps", "cli.py")
                    else " ".join(sys.argv)),
        "git": git if git is not None else git_revision(),
        "versions": versions(),
        "machine": machine_info(),
        "config": config,
        "results": results,
        **extra,
    }


def write_json(path: str | Path, doc: dict) -> None:
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(doc), indent=1, allow_nan=False) + "\n")


def jsonable(x):
    """Plain JSON values: non-finite floats become strings ("inf"), tuples lists, objects dicts."""
    if isinstance(x, float):
        return x if math.isfinite(x) else str(x)
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if x is None or isinstance(x, (str, int, bool)):
        return x
    if hasattr(x, "__dataclass_fields__"):
        from dataclasses import asdict

        return jsonable(asdict(x))
    return str(x)


def default_json_path(kind: str) -> str:
    return time.strftime(f"csps-bench-{kind}-%Y%m%d-%H%M%S.json")
