"""PNGs of runs: the step timeline (``plot_timeline``) and TBT over time (``plot_tbt``).

The step timeline shows what chunking does: with prefill-first a long prompt is one huge step during
which every decode waits; with stall-free batching the same prompt is many bounded steps that all
carry the running decodes. TBT over time shows what the requests feel: every generated token's gap to
the one before, against its time, with the long prompt's arrival and first token marked, so a chunk
that costs more the more KV is behind it shows up as gaps growing until the long prompt's first token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from csps.bench.report import RequestSample, StepSample, percentile
from csps.errors import CspsError


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise CspsError("plots need matplotlib (pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_timeline(runs: dict[str, list[StepSample]], path: str | Path, title: str = "") -> Path:
    """One column of two panels per run, sharing the time axis (s since the run's first step)."""
    plt = _pyplot()
    runs = {name: steps for name, steps in runs.items() if steps}
    if not runs:
        raise CspsError("nothing to plot: no steps were recorded")
    fig, axes = plt.subplots(2, len(runs), figsize=(6.5 * len(runs), 6), sharex="col", squeeze=False)
    max_ms = max(s.duration_s for steps in runs.values() for s in steps) * 1e3
    max_prefill = max(s.num_prefill_tokens for steps in runs.values() for s in steps)
    max_decode = max(s.num_decode_tokens for steps in runs.values() for s in steps)
    for col, (name, steps) in enumerate(runs.items()):
        t0 = steps[0].start_s
        x = [s.start_s - t0 for s in steps]
        width = [max(s.duration_s, 1e-9) for s in steps]
        top, bottom = axes[0][col], axes[1][col]
        top.bar(x, [s.duration_s * 1e3 for s in steps], width=width, align="edge", color="tab:gray")
        top.set_ylabel("step time (ms)")
        top.set_ylim(0, max_ms * 1.05)
        top.set_title(name)
        bottom.bar(x, [s.num_prefill_tokens for s in steps], width=width, align="edge", color="tab:orange",
                   label="prefill tokens")
        bottom.set_ylabel("prefill tokens in step", color="tab:orange")
        bottom.set_ylim(0, max_prefill * 1.05 or 1)
        bottom.set_xlabel("time since first step (s)")
        right = bottom.twinx()  # decodes are few tokens: their own axis
        right.step([*x, x[-1] + width[-1]], [*(s.num_decode_tokens for s in steps), steps[-1].num_decode_tokens],
                   where="post", color="tab:blue", label="decode tokens")
        right.set_ylabel("decode tokens in step", color="tab:blue")
        right.set_ylim(0, max_decode * 1.1 or 1)
    return _save(fig, path, title)


@dataclass(frozen=True)
class TbtSeries:
    """One run's token gaps: (time of the token since the run's origin, gap to the request's previous token),
    in seconds, each distinct point once (the decodes of one step share both)."""

    points: tuple[tuple[float, float], ...]  # the other requests' tokens
    long_points: tuple[tuple[float, float], ...]  # the long prompt's own tokens
    p99_s: float | None  # over every gap, duplicates included (the run's p99 TBT)
    long_arrival_s: float | None = None
    long_first_token_s: float | None = None
    reference_p99_s: float | None = None  # p99 TBT of the same requests without the long prompt


def tbt_series(requests: list[RequestSample], origin_s: float = 0.0,
               reference_p99_s: float | None = None) -> TbtSeries:
    """``origin_s``: the clock reading of the run's time 0 (a real run's start; 0 on the simulator's clock)."""
    points, long_points, gaps = set(), set(), []
    arrival = first = None
    for r in requests:
        times = r.metrics.token_times_s
        into = long_points if r.tag == "long" else points
        for a, b in zip(times, times[1:]):
            into.add((b - origin_s, b - a))
            gaps.append(b - a)
        if r.tag == "long":
            arrival = r.metrics.arrival_s - origin_s
            first = times[0] - origin_s if times else None
    return TbtSeries(tuple(sorted(points)), tuple(sorted(long_points)), percentile(gaps, 99), arrival, first,
                     reference_p99_s)


def _dur(seconds: float) -> str:
    return f"{seconds:.3g} s" if seconds >= 1 else f"{seconds * 1e3:.3g} ms"


def plot_tbt(runs: dict[str, TbtSeries], path: str | Path, title: str = "", columns: int | None = None) -> Path:
    """One panel per run (``columns`` per row), shared axes: gaps on a log scale against time, the long
    prompt's prefill shaded (arrival to first token), the run's p99 and the p99 without the long prompt."""
    plt = _pyplot()
    runs = {name: s for name, s in runs.items() if s.points or s.long_points}
    if not runs:
        raise CspsError("nothing to plot: no request generated two tokens")
    cols = max(1, min(columns or len(runs), len(runs)))
    rows = math.ceil(len(runs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 4.0 * rows), sharex=True, sharey=True, squeeze=False)
    for ax in axes.flat[len(runs):]:
        ax.set_visible(False)
    for ax, (name, s) in zip(axes.flat, runs.items()):
        if s.points:
            ax.scatter(*zip(*s.points), s=5, color="tab:blue", label="other requests' tokens", rasterized=True)
        if s.long_points:
            ax.scatter(*zip(*s.long_points), s=9, color="tab:orange", label="the long prompt's tokens")
        if s.long_arrival_s is not None:
            end = s.long_first_token_s if s.long_first_token_s is not None else s.long_arrival_s
            ax.axvspan(s.long_arrival_s, end, color="tab:orange", alpha=0.12,
                       label=f"long prompt: arrival to first token ({_dur(end - s.long_arrival_s)})")
            ax.axvline(s.long_arrival_s, color="tab:orange", lw=1)
        if s.p99_s:
            ax.axhline(s.p99_s, color="black", ls="--", lw=1, label=f"p99 TBT {_dur(s.p99_s)}")
        if s.reference_p99_s:
            ax.axhline(s.reference_p99_s, color="tab:green", ls=":", lw=1.5,
                       label=f"p99 without the long prompt {_dur(s.reference_p99_s)}")
        ax.set_yscale("log")
        ax.set_title(name, fontsize=10)
        ax.legend(fontsize=7, loc="best")
    for i, ax in enumerate(axes.flat[:len(runs)]):
        if i + cols >= len(runs):  # the lowest panel of its column
            ax.tick_params(labelbottom=True)
            ax.set_xlabel("time of the token (s since the run started)")
    for ax in axes[:, 0]:
        ax.set_ylabel("gap to the previous token (s)")
    return _save(fig, path, title)


def _save(fig, path, title: str | None) -> Path:
    """Title, lay out and write a figure (folders created), then free it."""
    plt = _pyplot()

    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
