"""``csps bench --validate``: calibrate the cost model on this machine, then predict real runs.

Calibration runs a few workloads (a 1.5k-6k prompt in chunks, batches of 4 and 16 short requests)
on the real engine and fits the local profile's efficiencies and overheads (``cost_model.fit``) to
the recorded steps; on two SP ranks it starts from the one-rank fit split over the ranks and refits
what the layout changes: attention efficiency and per-step overheads (plan broadcast, gathers, gloo). Validation then predicts
runs the fit never saw: one prompt of each length (TTFT) and batches of decodes (median TBT), on
one rank and, when the engine supports it, on two, and reports (predicted - measured) / measured. Other jobs share the machine and only ever
slow a run down, so each measurement is the fastest of ``--validate-repeats`` runs (each started, with
``--wait-quiet S``, after waiting up to S seconds for the other jobs to leave the CPU). The fitted
profile is cached for the ``--max-time`` guard of later ``csps bench`` runs of the same model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from csps.bench.report import default_json_path, percentile
from csps.bench.run import (
    build_engine,
    fitted_key,
    per_rank_profile,
    predict_real,
    run_real,
    wait_for_quiet,
    warm_up,
    warn_long_context,
)
from csps.bench.workloads import RequestSpec
from csps.dtypes import dtype_bytes
from csps.errors import CspsError
from csps.perf.cost_model import FIT_PARAMS, fit
from csps.perf.hardware import HardwareProfile, load_or_probe, save_cached
from csps.presets import preset_model_config


@dataclass(frozen=True)
class Case:
    name: str
    metric: str  # ttft_s.mean | tbt_s.p50
    specs: tuple[RequestSpec, ...]

    def value(self, summary: dict) -> float | None:
        group, key = self.metric.split(".")
        return summary[group][key]


CALIBRATION_PROMPT_LENS = (1536, 3072, 6144)  # never a validated length (those are powers of two)
CALIBRATION_MAX_PREFILL_S = 10.0


def _random_specs(n: int, prompt_len: int, output_len: int, seed: int, vocab: int,
                  with_ids: bool = True) -> tuple[RequestSpec, ...]:
    from csps.bench.workloads import WorkloadConfig, make_workload

    cfg = WorkloadConfig(num_prompts=n, prompt_len=prompt_len, output_len=output_len, seed=seed)
    return tuple(make_workload(cfg, with_ids=with_ids, vocab_size=vocab))


def validation_cases(lengths: list[int], batches: list[int], vocab: int, sp: int) -> list[Case]:
    cases = [Case(f"sp{sp} prefill {n // 1024 if n % 1024 == 0 else n}{'k' if n % 1024 == 0 else ''}",
                  "ttft_s.mean", _random_specs(1, n, 2, 100 + i, vocab)) for i, n in enumerate(lengths)]
    cases += [Case(f"sp{sp} decode batch {b}", "tbt_s.p50", _random_specs(b, 256, 32, 200 + b, vocab))
              for b in batches]
    return cases


def calibration_prompt_len(lengths: list[int], config, model, probe: HardwareProfile) -> int:
    """The longest of 1.5k/3k/6k tokens that is at most half the longest validated prompt and whose
    prefill the probed profile predicts within 10 s (attention efficiency grows with the context)."""
    best = CALIBRATION_PROMPT_LENS[0]
    for n in CALIBRATION_PROMPT_LENS[1:]:
        if n <= max(lengths) // 2 and predict_real(list(_random_specs(1, n, 1, 0, 0, with_ids=False)), config, model,
                                                    probe)["duration_s"] <= CALIBRATION_MAX_PREFILL_S:
            best = n
    return best


def calibration_specs(vocab: int, prompt_len: int) -> list[tuple[RequestSpec, ...]]:
    """Workloads whose steps calibrate the profile (a long prompt in chunks, two batches of short
    requests decoding); none of them is a validation case."""
    return [_random_specs(1, prompt_len, 4, 1, vocab), _random_specs(4, 128, 24, 3, vocab),
            _random_specs(16, 192, 12, 4, vocab)]


def lifted(probe: HardwareProfile, lift: float = 4.0) -> HardwareProfile:
    """The probe with every peak lifted, efficiencies lowered to match: the fit clamps efficiencies to
    <= 1, and the model's kernels may outrun a probe taken while the machine was busy."""
    return probe.with_(peak_flops=probe.peak_flops * lift, peak_flops_fp32=probe.peak_flops_fp32 * lift,
                       mem_bandwidth_bytes_per_s=probe.mem_bandwidth_bytes_per_s * lift,
                       matmul_efficiency=probe.matmul_efficiency / lift,
                       attention_efficiency=probe.attention_efficiency / lift,
                       mem_efficiency=probe.mem_efficiency / lift)


def _quiet_run(engine, specs, label: str, progress: bool, wait_s: float):
    if wait_s:
        wait_for_quiet(wait_s)
    return run_real(engine, list(specs), label=label, progress=progress)


def calibrate(engine, workloads: list[tuple[RequestSpec, ...]], start: HardwareProfile, repeats: int,
              params: tuple[str, ...] = FIT_PARAMS, wait_s: float = 0.0) -> tuple[HardwareProfile, float]:
    """Fit ``params`` of ``start`` (one rank's profile) to real steps of ``workloads``; each runs
    ``repeats`` times (the same steps each time) and the fastest time of each step counts."""
    samples = []
    for specs in workloads:
        runs = [_quiet_run(engine, specs, "calibrate", False, wait_s) for _ in range(repeats)]
        if any(len(r.shapes) != len(runs[0].shapes) for r in runs):
            runs = runs[:1]  # a preemption changed the steps: keep one run
        for i, shape in enumerate(runs[0].shapes):
            if shape.num_seqs:
                samples.append((shape, min(r.steps[i].duration_s for r in runs)))
    result = fit(samples, start, engine.model_config, dtype_bytes(engine.config.dtype), params=params)
    return result.profile, result.median_abs_rel_error


def _describe(hw: HardwareProfile, e: int) -> str:
    peak = hw.peak_flops_for(e)
    return (f"matmul {peak * hw.matmul_efficiency / 1e9:.3g} GFLOP/s, attention "
            f"{peak * hw.attention_efficiency / 1e9:.3g} GFLOP/s, memory "
            f"{hw.mem_bandwidth_bytes_per_s * hw.mem_efficiency / 1e9:.3g} GB/s, step overhead "
            f"{1e3 * hw.step_overhead_s:.2f} ms + {1e3 * hw.seq_overhead_s:.2f} ms per sequence")


def main_validate(a) -> int:
    from csps.bench.report import document, git_revision, write_json
    from csps.cli_args import engine_kwargs, parse_len
    from csps.llm import make_engine_config

    git = git_revision()
    lengths = [parse_len(x) for x in a.validate_lengths.split(",") if x.strip()]
    batches = [int(x) for x in a.validate_batches.split(",") if x.strip()]
    kw = {**engine_kwargs(a), "token_budget": a.token_budget or 512, "enable_prefix_caching": False}
    model = preset_model_config(a.model)
    vocab = min(model.vocab_size, 49152) if model else 49152
    config = make_engine_config(**{k: v for k, v in kw.items() if k != "max_model_len"})
    probe = load_or_probe(dtype_bytes=dtype_bytes(config.dtype))
    calib_len = calibration_prompt_len(lengths, config, model, probe) if model else CALIBRATION_PROMPT_LENS[0]
    workloads = calibration_specs(vocab, calib_len)
    sizing = [s for c in validation_cases(lengths, batches, vocab, 1) for s in c.specs]
    sizing += [s for specs in workloads for s in specs]
    warn_long_context(max(s.prompt_len + s.output_len for s in sizing), model)
    rows, notes, fits = [], [], {}
    engine = build_engine({**kw, "sp": 1, "tp": 1}, sizing)
    model, e = engine.model_config, dtype_bytes(engine.config.dtype)
    try:
        warm_up(engine)
        t0 = time.perf_counter()
        hw, err = calibrate(engine, workloads, lifted(probe), a.validate_repeats, wait_s=a.wait_quiet)
        fits["sp1"] = {"profile": hw.to_dict(), "median_abs_error": err, "seconds": time.perf_counter() - t0}
        print(f"calibrated SP 1 in {time.perf_counter() - t0:.0f} s on a {calib_len}-token prompt and two decode "
              f"batches (median fit error {100 * err:.1f}%): {_describe(hw, e)}")
        save_cached(hw, fitted_key(a.model, e))
        rows += _validate_on(engine, validation_cases(lengths, batches, vocab, 1), hw, a, per_rank=False)
    finally:
        engine.shutdown()
        del engine
    try:
        engine = build_engine({**kw, "sp": 2, "tp": 1, "sp_threshold_tokens": min(lengths + [calib_len]) - 1},
                              sizing)
    except CspsError as err:
        notes.append(f"SP 2 skipped: {err}")
        engine = None
    if engine is not None:
        try:
            _validate_sp2(engine, workloads, hw, lengths, batches, vocab, a, rows, fits, e)
        except CspsError as err:  # report what SP 1 measured even when the SP engine fails
            notes.append(f"SP 2 failed: {err}")
        finally:
            engine.shutdown()
    errors = [abs(r["error"]) for r in rows if r["error"] is not None]
    median = percentile(errors, 50) if errors else float("nan")
    print(f"{'case':<24}{'measured':>12}{'predicted':>12}{'error':>9}")
    for r in rows:
        print(f"{r['case']:<24}{r['measured_s']:>11.4g}s{r['predicted_s']:>11.4g}s{100 * r['error']:>8.1f}%")
    print(f"median |error| {100 * median:.1f}% over {len(errors)} cases (target <= 20%)")
    for n in notes:
        print(n)
    path = a.json or default_json_path("validate")
    config_doc = {"engine": kw, "lengths": lengths, "batches": batches, "calibration_prompt_len": calib_len,
                  "repeats": a.validate_repeats, "model_config": model, "probe": probe.to_dict()}
    write_json(path, document("csps bench --validate", config_doc,
                              {"cases": rows, "median_abs_error": median, "fits": fits, "notes": notes}, git=git))
    print(f"results: {path}")
    return 0


def _validate_sp2(engine, workloads, hw: HardwareProfile, lengths, batches, vocab, a, rows, fits, e) -> None:
    warm_up(engine)
    # the ranks split the SP 1 fit's compute; refit on the same calibration workloads what the
    # multi-process layout changes: per-step costs (plan broadcast, gathers, gloo exchanges)
    # and attention (zigzag shards, partial results merged by LSE)
    hw2, err2 = calibrate(engine, workloads, per_rank_profile(hw, 2), a.validate_repeats,
                          params=("attention_efficiency", "step_overhead_s", "seq_overhead_s"), wait_s=a.wait_quiet)
    fits["sp2"] = {"profile": hw2.to_dict(), "median_abs_error": err2}
    print(f"calibrated SP 2 (median fit error {100 * err2:.1f}%), per rank: {_describe(hw2, e)}")
    rows += _validate_on(engine, validation_cases(lengths, batches[:2], vocab, 2), hw2, a, per_rank=True)


def _validate_on(engine, cases: list[Case], hw: HardwareProfile, a, per_rank: bool) -> list[dict]:
    """Each case runs ``--validate-repeats`` times; the fastest (least disturbed by other jobs) counts."""
    rows = []
    for case in cases:
        predicted = case.value(predict_real(list(case.specs), engine.config, engine.model_config, hw, per_rank))
        runs = [case.value(_quiet_run(engine, case.specs, case.name.replace(" ", "-"), not a.no_progress,
                                      a.wait_quiet).summary) for _ in range(a.validate_repeats)]
        measured = min(runs)
        err = (predicted - measured) / measured if measured and predicted is not None else None
        rows.append({"case": case.name, "metric": case.metric, "measured_s": measured, "predicted_s": predicted,
                     "error": err, "all_measured_s": runs})
        print(f"  {case.name}: measured {measured:.4g} s (fastest of {len(runs)}), predicted {predicted:.4g} s")
    return rows
