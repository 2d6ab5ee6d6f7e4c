"""``csps bench --simulate``: the simulator driven from the command line (strategies side by side, each
with the scheduling set-ups and workload variants of ``csps.bench.variants``)."""

from __future__ import annotations

from dataclasses import replace

from csps.bench.simulator import SimRun, Strategy, simulate, standard_strategies
from csps.bench.variants import RunSetup, run_name
from csps.config import ModelConfig
from csps.errors import CspsError
from csps.presets import preset_model_config


def model_for_simulation(model_flag: str) -> ModelConfig:
    model = preset_model_config(model_flag)
    if model is None:
        raise CspsError(f"--simulate needs a model architecture without weights: dummy:<preset> or smollm2, "
                        f"not {model_flag!r}")
    return model


def select_strategies(all_: list[Strategy], names: str | None, setups: list[RunSetup]) -> list[Strategy]:
    """The strategies ``--strategies`` names (prefixes), each once per set-up (``strategy/setup`` when there
    are several), scheduling as the set-up says."""
    chosen = all_
    if names:
        wanted = [n.strip() for n in names.split(",") if n.strip()]
        chosen = [s for s in all_ if any(s.name.startswith(w) for w in wanted)]
        if not chosen:
            raise CspsError(f"no strategy matches {names!r} (available: {', '.join(s.name for s in all_)})")
    return [replace(s, name=s.name if len(setups) == 1 else f"{s.name}/{c.name}", **c.scheduler_fields())
            for s in chosen for c in setups]


def main_simulate(a) -> int:
    from csps.bench.report import default_json_path, document, format_table, write_json
    from csps.bench.run import local_profile
    from csps.bench.variants import (
        format_long_report,
        long_arrival_report,
        ratio_columns,
        run_setups,
        select,
        workload_variants,
    )
    from csps.bench.workloads import workload_dict, workload_from_args
    from csps.device import resolve_dtype
    from csps.perf.hardware import get_profile

    model = model_for_simulation(a.model)
    setups, variants = run_setups(a), workload_variants(a)
    specs = workload_from_args(a, with_ids=False)
    if a.hardware == "local":
        e = 2 if resolve_dtype(a.dtype) == "bfloat16" else 4
        hw, origin = local_profile(a.model, e)
    else:
        e = 4 if a.dtype == "float32" else 2  # GPUs: bf16 unless asked otherwise
        hw, origin = get_profile(a.hardware), "published specifications"
    budget = a.token_budget or 512  # Sarathi-Serve's strict-SLO budget: what the GPU strategies are compared at
    strategies = select_strategies(
        standard_strategies(a.gpus, tp=a.tp, token_budget=budget, policy=a.schedule_policy,
                            sp_threshold_tokens=a.sp_threshold, num_kv_heads=model.num_kv_heads),
        a.strategies, setups)
    print(f"simulating {model.name} on {a.gpus} x {hw.name} ({origin}), {'bf16' if e == 2 else 'fp32'}, "
          f"{len(specs)} request(s), token budget {budget} per rank")
    runs: dict[str, SimRun] = {}
    for variant in variants:
        for s in strategies:
            runs[run_name(s.name, variant)] = simulate(select(specs, variant), s, model, hw, e,
                                                       block_size=a.block_size, max_num_seqs=a.max_num_seqs,
                                                       progress=not a.no_progress)
    summaries = {n: r.summary for n, r in runs.items()}
    ratio = ratio_columns(setups)
    if ratio is not None:  # between the first strategy's set-ups
        first = {c.name: s.name for c, s in zip(setups, strategies)}
        ratio = (first[ratio[0]], first[ratio[1]])
    print(format_table({s.name: summaries[s.name] for s in strategies}, ratio_of=ratio))
    report = None
    if len(variants) > 1:
        report = long_arrival_report(summaries, [s.name for s in strategies])
        print(format_long_report(report))
    path = a.json or default_json_path("simulate")
    config = {"model": a.model, "model_config": model, "hardware": hw.to_dict(), "gpus": a.gpus, "tp": a.tp,
              "dtype_bytes": e, "token_budget": budget, "block_size": a.block_size, "workload": workload_dict(a),
              "setups": setups, "variants": variants}
    write_json(path, document("csps bench --simulate", config, summaries,
                              **({"long_arrival": report} if report else {})))
    print(f"results: {path}")
    title = f"simulated: {model.name} on {a.gpus} x {hw.name}"
    if a.plot:
        from csps.bench.plot import plot_timeline

        plot_timeline({s.name: runs[s.name].steps for s in strategies}, a.plot, title=title)
        print(f"plot: {a.plot}")
    if a.plot_tbt:
        from csps.bench.plot import plot_tbt, tbt_series

        series = {s.name: tbt_series(runs[s.name].requests, 0.0, _p99(summaries.get(run_name(s.name, "without-long"))))
                  for s in strategies}
        plot_tbt(series, a.plot_tbt, title=title, columns=len(setups))
        print(f"TBT plot: {a.plot_tbt}")
    return 0


def _p99(summary: dict | None) -> float | None:
    return summary["tbt_s"]["p99"] if summary else None
