"""``csps bench --simulate``: the simulator driven from the command line (strategies side by side)."""

from __future__ import annotations

from csps.bench.simulator import Strategy, simulate, standard_strategies
from csps.config import ModelConfig
from csps.errors import CspsError
from csps.presets import preset_model_config


def model_for_simulation(model_flag: str) -> ModelConfig:
    model = preset_model_config(model_flag)
    if model is None:
        raise CspsError(f"--simulate needs a model architecture without weights: dummy:<preset> or smollm2, "
                        f"not {model_flag!r}")
    return model


def select_strategies(all_: list[Strategy], names: str | None, compare_policies: bool) -> list[Strategy]:
    from dataclasses import replace

    chosen = all_
    if names:
        wanted = [n.strip() for n in names.split(",") if n.strip()]
        chosen = [s for s in all_ if any(s.name.startswith(w) for w in wanted)]
        if not chosen:
            raise CspsError(f"no strategy matches {names!r} (available: {', '.join(s.name for s in all_)})")
    if compare_policies:
        chosen = [replace(s, name=f"{s.name}/{p}", policy=p) for s in chosen for p in ("stall-free", "prefill-first")]
    return chosen


def main_simulate(a) -> int:
    from csps.bench.report import default_json_path, document, format_table, write_json
    from csps.bench.run import local_profile
    from csps.bench.workloads import workload_dict, workload_from_args
    from csps.device import resolve_dtype
    from csps.perf.hardware import get_profile

    model = model_for_simulation(a.model)
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
        a.strategies, a.compare_policies)
    print(f"simulating {model.name} on {a.gpus} x {hw.name} ({origin}), {'bf16' if e == 2 else 'fp32'}, "
          f"{len(specs)} request(s), token budget {budget} per rank")
    runs = {}
    for s in strategies:
        runs[s.name] = simulate(specs, s, model, hw, e, block_size=a.block_size, max_num_seqs=a.max_num_seqs,
                                progress=not a.no_progress)
    summaries = {n: r.summary for n, r in runs.items()}
    ratio = None
    if a.compare_policies and len(strategies) >= 2:
        ratio = (strategies[1].name, strategies[0].name)
    print(format_table(summaries, ratio_of=ratio))
    path = a.json or default_json_path("simulate")
    config = {"model": a.model, "model_config": model, "hardware": hw.to_dict(), "gpus": a.gpus, "tp": a.tp,
              "dtype_bytes": e, "token_budget": budget, "block_size": a.block_size, "workload": workload_dict(a)}
    write_json(path, document("csps bench --simulate", config, summaries))
    print(f"results: {path}")
    if a.plot:
        from csps.bench.plot import plot_timeline

        plot_timeline({n: r.steps for n, r in runs.items()}, a.plot, title=f"simulated: {model.name} on {hw.name}")
        print(f"plot: {a.plot}")
    return 0
