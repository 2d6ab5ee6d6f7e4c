"""The step timeline PNG: step time, and prefill vs decode tokens per step, for one or more runs.

The picture that shows what chunking does: with prefill-first a long prompt is one huge step during
which every decode waits; with stall-free batching the same prompt is many bounded steps that all
carry the running decodes.
"""

from __future__ import annotations

from pathlib import Path

from csps.bench.report import StepSample
from csps.errors import CspsError


def plot_timeline(runs: dict[str, list[StepSample]], path: str | Path, title: str = "") -> Path:
    """One column of two panels per run, sharing the time axis (s since the run's first step)."""
    try:
        import matplotlib
    except ImportError:
        raise CspsError("--plot needs matplotlib (pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
