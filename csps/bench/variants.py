"""Runs side by side in one ``csps bench`` invocation: scheduling set-ups × workload variants.

Set-ups (``run_setups``): the schedule policy (``--compare-policies``: stall-free and prefill-first) and
how stall-free batching sizes prefill chunks (``--compare-chunking``: ``time-budget``, chunks sized to a
step time budget, ``--step-time-budget-ms`` or auto, against ``token-budget``, the token budget alone).

Workload variants (``--long-baselines``, with ``--long-prompt-len``): the workload as given, the same
requests without the long prompt (``without-long``) and the long prompt alone (``long-alone``). Variants
are cut from the one generated workload, so every run sees the very same requests (prompt ids included).

``long_arrival_report`` reduces them to what issue 16 judges: p99 TBT with the long arrival over p99 TBT
without it, and the long prompt's TTFT among the others over its TTFT alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from csps.bench.workloads import RequestSpec
from csps.errors import CspsError

VARIANTS = ("", "without-long", "long-alone")  # "": the workload as given
LONG_TAG = "long"


@dataclass(frozen=True)
class RunSetup:
    """How one column of the table schedules: policy and chunk sizing (``SchedulerConfig``'s fields)."""

    name: str
    policy: str = "stall-free"
    adaptive_chunking: bool = True
    step_time_budget_ms: float | None = None  # None: auto (the decodes plus the fresh chunk the token budget leaves them)

    def scheduler_fields(self) -> dict:
        return {"policy": self.policy, "adaptive_chunking": self.adaptive_chunking,
                "step_time_budget_ms": self.step_time_budget_ms}


def chunking_from_flag(value: str | float) -> tuple[bool, float | None]:
    """``--step-time-budget-ms`` (auto | off | milliseconds) -> (adaptive_chunking, step_time_budget_ms)."""
    if value == "off":
        return False, None
    return True, (float(value) if not isinstance(value, str) else None)


def run_setups(a) -> list[RunSetup]:
    """The set-ups the flags ask for, in column order. Names stay the policy names unless chunking is compared."""
    adaptive, budget_ms = chunking_from_flag(getattr(a, "step_time_budget_ms", "auto"))
    compare_chunking = getattr(a, "compare_chunking", False)
    if not compare_chunking:
        policies = ("stall-free", "prefill-first") if a.compare_policies else (a.schedule_policy,)
        return [RunSetup(p, p, adaptive, budget_ms) for p in policies]
    if a.schedule_policy == "prefill-first" and not a.compare_policies:
        raise CspsError("--compare-chunking compares how stall-free batching sizes its chunks; prefill-first "
                        "runs whole prompts (drop --schedule-policy prefill-first, or add --compare-policies)")
    prefix = "stall-free/" if a.compare_policies else ""
    out = [RunSetup(f"{prefix}time-budget", "stall-free", True, budget_ms),
           RunSetup(f"{prefix}token-budget", "stall-free", False, None)]
    if a.compare_policies:
        out.append(RunSetup("prefill-first", "prefill-first", adaptive, budget_ms))
    return out


def ratio_columns(setups: list[RunSetup]) -> tuple[str, str] | None:
    """The table's ratio column (a / b): token budget over time budget, else prefill-first over stall-free."""
    names = [s.name for s in setups]
    for a, b in (("token-budget", "time-budget"), ("prefill-first", "stall-free")):
        match_a = [n for n in names if n.endswith(a)]
        match_b = [n for n in names if n.endswith(b)]
        if match_a and match_b:
            return match_a[0], match_b[0]
    return None


def workload_variants(a) -> tuple[str, ...]:
    if not getattr(a, "long_baselines", False):
        return ("",)
    if a.long_prompt_len is None:
        raise CspsError("--long-baselines compares runs with and without the long prompt: give --long-prompt-len")
    if a.num_prompts == 0:
        raise CspsError("--long-baselines needs other requests besides the long prompt (--num-prompts >= 1)")
    return VARIANTS


def select(specs: list[RequestSpec], variant: str) -> list[RequestSpec]:
    """The requests of one workload variant (module docstring)."""
    if variant == "":
        return list(specs)
    if variant == "without-long":
        return [s for s in specs if s.tag != LONG_TAG]
    if variant == "long-alone":
        return [s for s in specs if s.tag == LONG_TAG]
    raise CspsError(f"unknown workload variant {variant!r} ({', '.join(v or 'as given' for v in VARIANTS)})")


def run_name(setup_name: str, variant: str) -> str:
    return f"{setup_name}/{variant}" if variant else setup_name


# --- the report --------------------------------------------------------------------------------------

def _get(summary: dict | None, *path):
    for p in path:
        if not isinstance(summary, dict) or summary.get(p) is None:
            return None
        summary = summary[p]
    return summary


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def long_arrival_report(summaries: dict[str, dict], names: list[str]) -> dict[str, dict]:
    """For each run ``name`` of the workload as given (with its ``/without-long`` and ``/long-alone``
    runs): p99 TBT with / without the long prompt, and the long prompt's TTFT with the others / alone.
    ``tbt_p50_without_s`` is the typical step of the workload without it (mostly decode-only steps)."""
    out = {}
    for name in names:
        w = summaries.get(name)
        wo = summaries.get(run_name(name, "without-long"))
        alone = summaries.get(run_name(name, "long-alone"))
        row = {
            "tbt_p99_with_s": _get(w, "tbt_s", "p99"),
            "tbt_p99_without_s": _get(wo, "tbt_s", "p99"),
            "tbt_max_with_s": _get(w, "tbt_s", "max"),
            "tbt_p50_without_s": _get(wo, "tbt_s", "p50"),
            "long_ttft_with_s": _get(w, "long_prompt_ttft_s"),
            "long_ttft_alone_s": _get(alone, "long_prompt_ttft_s"),
        }
        row["tbt_p99_ratio"] = _ratio(row["tbt_p99_with_s"], row["tbt_p99_without_s"])
        row["long_ttft_ratio"] = _ratio(row["long_ttft_with_s"], row["long_ttft_alone_s"])
        out[name] = row
    return out


def _ms(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.2f} s" if x >= 1 else f"{x * 1e3:.3g} ms"


def _x(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


REPORT_COLUMNS = (
    ("p99 TBT with", "tbt_p99_with_s", _ms), ("p99 TBT without", "tbt_p99_without_s", _ms),
    ("TBT ratio", "tbt_p99_ratio", _x), ("TBT max with", "tbt_max_with_s", _ms),
    ("p50 TBT without", "tbt_p50_without_s", _ms), ("long TTFT with", "long_ttft_with_s", _ms),
    ("long TTFT alone", "long_ttft_alone_s", _ms), ("TTFT ratio", "long_ttft_ratio", _x),
)


def format_long_report(report: dict[str, dict]) -> str:
    """One row per run: the two ratios issue 16 sets targets for (both <= 1.5x), with their parts."""
    header = ["run"] + [c[0] for c in REPORT_COLUMNS]
    lines = [header] + [[name] + [fmt(row[key]) for _, key, fmt in REPORT_COLUMNS] for name, row in report.items()]
    widths = [max(len(r[i]) for r in lines) for i in range(len(header))]
    out = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
           for r in lines]
    out.insert(1, "-" * len(out[0]))
    out.append("TBT ratio = p99 TBT with the long prompt / without it; TTFT ratio = the long prompt's TTFT among "
               "the others / alone")
    return "\n".join(out)
