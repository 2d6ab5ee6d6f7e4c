"""``csps bench``: the real engine on this machine, one workload, the numbers users judge by.

``run_real`` feeds a workload (``csps.bench.workloads``) to an engine built by ``create_engine`` (so SP > 1
works once the multi-rank engine lands), adding each request when its arrival time has passed on the
wall clock, stepping until all finish. It records every step: the engine's ``step_log`` (time,
tokens, bytes by kind) plus the step's shape, read by wrapping the scheduler's ``schedule`` (the
engine does not log shapes yet), from which the cost model counts the step's useful FLOPs.

``predict_real`` is the same run on the simulator's virtual clock with this machine's profile (the
one ``csps bench --validate`` fitted for the model, else the probe): the ``--max-time`` guard and the
predictions ``csps.bench.validate`` checks.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

from csps.bench.report import (
    RequestSample,
    StepSample,
    default_json_path,
    summarize_run,
)
from csps.bench.simulator import Strategy, kv_bytes_per_block, simulate, step_shape
from csps.bench.workloads import RequestSpec, workload_dict, workload_from_args
from csps.config import ModelConfig
from csps.dtypes import dtype_bytes
from csps.errors import CspsError
from csps.perf.cost_model import StepShape, predict_step
from csps.perf.hardware import (
    HardwareProfile,
    cache_key,
    default_cache_path,
    load_or_probe,
)
from csps.presets import preset_model_config

log = logging.getLogger("csps.bench")

@dataclass
class RealRun:
    label: str
    summary: dict
    steps: list[StepSample] = field(default_factory=list)
    shapes: list[StepShape] = field(default_factory=list)  # one per step, in order
    requests: list[RequestSample] = field(default_factory=list)
    origin_s: float = 0.0  # perf_counter() at the run's time 0 (request metrics are perf_counter() readings)


class ShapeRecorder:
    """A step observer of the engine: keeps each step's shape (the cost model's view of it)."""

    def __init__(self, num_ranks: int, strategy: Strategy) -> None:
        self.num_ranks = num_ranks
        self.strategy = strategy
        self.by_step: dict[int, StepShape] = {}

    def __call__(self, out, record) -> None:
        self.by_step[out.step_id] = step_shape(out, self.num_ranks, self.strategy)


def engine_strategy(config) -> Strategy:
    """The simulator's view of an engine config (same scheduler settings, same parallel layout)."""
    p = config.parallel
    return Strategy(name="local", sp=p.sp, tp=p.tp, exchange="ulysses" if p.sp_attn == "ulysses" else "auto",
                    policy=config.scheduler.policy, token_budget=config.scheduler.token_budget,
                    sp_threshold_tokens=p.sp_threshold_tokens, adaptive_chunking=config.scheduler.adaptive_chunking,
                    step_time_budget_ms=config.scheduler.step_time_budget_ms)


# --- this machine's profile ---------------------------------------------------------------------

def fitted_key(model_flag: str, dtype_bytes: int) -> str:
    return f"{cache_key(None, dtype_bytes)}|fit|{model_flag}"


def local_profile(model_flag: str | None, dtype_bytes: int) -> tuple[HardwareProfile, str]:
    """The profile ``--validate`` calibrated for this ``--model`` if there is one, else the probe."""
    import json

    if model_flag:
        try:
            data = json.loads(default_cache_path().read_text())
            if (key := fitted_key(model_flag, dtype_bytes)) in data:
                return HardwareProfile.from_dict(data[key]), "fitted by --validate"
        except (OSError, ValueError, TypeError, KeyError, CspsError):
            pass
    return load_or_probe(dtype_bytes=dtype_bytes), "probed"


def matmul_peak_flops(dtype_bytes: int) -> float:
    """This machine's measured matmul FLOP/s in the dtype (the probe, never a fitted profile)."""
    hw = load_or_probe(dtype_bytes=dtype_bytes)
    return hw.peak_flops_for(dtype_bytes) * hw.matmul_efficiency


# --- running ---------------------------------------------------------------------------------------

def busy_cores_of_others(interval_s: float = 1.0) -> float:
    """Cores kept busy by other processes over ``interval_s`` (/proc/stat minus this process's CPU)."""
    def snap() -> tuple[float, float, float]:
        with open("/proc/stat") as f:
            ticks = [float(x) for x in f.readline().split()[1:]]
        return sum(ticks), ticks[3] + ticks[4], time.process_time()  # total, idle + iowait, own CPU s

    total0, idle0, own0 = snap()
    time.sleep(interval_s)
    total1, idle1, own1 = snap()
    if total1 <= total0:
        return 0.0
    busy = (1 - (idle1 - idle0) / (total1 - total0)) * (os.cpu_count() or 1)
    return max(0.0, busy - (own1 - own0) / interval_s)


def wait_for_quiet(max_wait_s: float, max_busy_cores: float = 0.3) -> float:
    """Wait (at most ``max_wait_s``) for two seconds in a row in which other processes use less than
    ``max_busy_cores``: this machine is shared, and a run that overlaps another job measures both.
    Returns the seconds waited (0 when not on Linux)."""
    t0, quiet = time.monotonic(), 0
    try:
        while quiet < 2 and time.monotonic() - t0 < max_wait_s:
            quiet = quiet + 1 if busy_cores_of_others() < max_busy_cores else 0
    except (OSError, ValueError, IndexError):
        return 0.0
    return time.monotonic() - t0


def run_real(engine, specs: list[RequestSpec], *, label: str = "run", progress: bool = True,
             peak_flops_per_s: float | None = None) -> RealRun:
    """Run the workload on ``engine`` in real time; every request finishes (or the run raises)."""
    from csps.core.sampling_params import SamplingParams

    if any(s.prompt_ids is None for s in specs):
        raise CspsError("a real run needs token ids (make_workload(..., with_ids=True))")
    model = engine.model_config
    e = dtype_bytes(engine.config.dtype)
    strategy = engine_strategy(engine.config)
    if peak_flops_per_s is None:
        peak_flops_per_s = matmul_peak_flops(e)
    recorder = ShapeRecorder(engine.num_sp_ranks, strategy)
    engine.step_observers.append(recorder)
    first_step = len(engine.step_log)
    pending = sorted(specs, key=lambda s: s.arrival_s)
    tags: dict[str, RequestSpec] = {}
    finished: dict[str, object] = {}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(s.prompt_len + s.output_len for s in specs), unit="tok", desc=label,
                   dynamic_ncols=True)
    nxt = 0
    t0 = time.perf_counter()
    try:
        while nxt < len(pending) or engine.has_unfinished():
            now = time.perf_counter()
            while nxt < len(pending) and t0 + pending[nxt].arrival_s <= now:
                spec = pending[nxt]
                params = SamplingParams(max_tokens=spec.output_len, ignore_eos=True, temperature=0.0)
                rid = engine.add_request(list(spec.prompt_ids), params, request_id=f"{label}-{nxt}",
                                         arrival_s=t0 + spec.arrival_s)
                tags[rid] = spec
                nxt += 1
            if not engine.has_unfinished():
                time.sleep(max(0.0, t0 + pending[nxt].arrival_s - time.perf_counter()))
                continue
            for o in engine.step():
                if o.finished:
                    finished[o.request_id] = o
            if bar is not None and engine.step_log:
                r = engine.step_log[-1]
                bar.update(r.num_prefill_tokens + r.num_decode_tokens)
    finally:
        engine.step_observers.remove(recorder)
        if bar is not None:
            bar.close()
        for rid in tags:
            if rid not in finished:
                engine.abort(rid)
    records = list(engine.step_log)[first_step:]
    count_hw = load_or_probe(dtype_bytes=e)  # FLOP counts depend on the shape only, not on the profile
    steps, shapes = [], []
    for rec in records:
        shape, used = recorder.by_step.get(rec.step_id, StepShape()), rec.kv_blocks_used
        flops = predict_step(shape, model, count_hw, e).flops if shape.num_seqs else 0.0
        shapes.append(shape)
        steps.append(StepSample(rec.start_s - t0, rec.duration_s, rec.num_prefill_tokens, rec.num_decode_tokens,
                                rec.num_seqs, flops, dict(rec.bytes_by_kind), used))
    samples = [RequestSample(tags[rid].prompt_len, len(o.token_ids), o.metrics, tags[rid].tag)
               for rid, o in finished.items()]
    p = engine.config.parallel
    summary = summarize_run(samples, steps, peak_flops_per_s=peak_flops_per_s,
                            kv_bytes_per_block=kv_bytes_per_block(model, e, engine.config.cache.block_size, p.tp),
                            num_ranks=p.sp)
    return RealRun(label, summary, steps, shapes, samples, origin_s=t0)


def per_rank_profile(hw: HardwareProfile, world: int) -> HardwareProfile:
    """Ranks on one machine share its cores and memory: each gets 1/world of them."""
    if world <= 1:
        return hw
    return hw.with_(peak_flops=hw.peak_flops / world, peak_flops_fp32=hw.peak_flops_fp32 / world,
                    mem_bandwidth_bytes_per_s=hw.mem_bandwidth_bytes_per_s / world, mem_bytes=hw.mem_bytes // world)


def predict_real(specs: list[RequestSpec], config, model: ModelConfig, hw: HardwareProfile,
                 per_rank: bool = False) -> dict:
    """The simulator's summary for this machine and engine config; ``hw`` is the whole machine's
    profile (``local_profile``), split over the ranks, unless ``per_rank``."""
    strategy = engine_strategy(config)
    if not per_rank:
        hw = per_rank_profile(hw, strategy.sp * strategy.tp)
    return simulate(specs, strategy, model, hw, dtype_bytes(config.dtype),
                    block_size=config.cache.block_size, max_num_seqs=config.scheduler.max_num_seqs).summary


def check_max_time(specs: list[RequestSpec], config, model: ModelConfig, max_time_s: float,
                   model_flag: str) -> tuple[float, str]:
    """Predicted duration of the run and the profile's origin; raises if it exceeds ``max_time_s``."""
    hw, origin = local_profile(model_flag, dtype_bytes(config.dtype))
    predicted = predict_real(specs, config, model, hw)["duration_s"] + min(s.arrival_s for s in specs)
    if predicted > max_time_s:
        raise CspsError(
            f"the cost model ({origin} profile of this machine) predicts {predicted / 60:.1f} min for this run, "
            f"more than --max-time {max_time_s / 60:.1f} min. Study it with `csps bench --simulate --model "
            f"{model_flag} ...` (predicted numbers for GPU clusters), use a smaller model or prompt "
            f"(e.g. --model dummy:tiny), or raise --max-time")
    return predicted, origin


# --- csps bench (real) -------------------------------------------------------------------------------

def auto_token_budget(num_requests: int, max_prompt_len: int, block_size: int) -> int:
    """Sarathi-Serve's strict-SLO budget (512) when requests share steps; for a lone prompt, bigger
    chunks (prompt/32, at most 8192): nothing waits on it, and fewer steps re-read less KV."""
    budget = 512 if num_requests > 1 else min(max(max_prompt_len // 32, 512), 8192)
    return max(block_size, budget - budget % block_size)


def blocks_for(specs: list[RequestSpec], block_size: int) -> int:
    """KV blocks (per rank) that hold the whole workload at once, plus the scheduler's 1% watermark."""
    need = sum(-(-(s.prompt_len + s.output_len) // block_size) for s in specs)
    return need + need // 50 + 8


def warn_long_context(max_len: int, model: ModelConfig | None) -> None:
    if model is not None and max_len > model.max_position_embeddings:
        log.warning("requests reach %d tokens, beyond %s's trained context of %d: running anyway "
                    "(bench measures speed, not quality)", max_len, model.name or "the model",
                    model.max_position_embeddings)


def build_engine(kw: dict, specs: list[RequestSpec]):
    """An engine sized for the workload: context = the longest request, KV blocks for all of it."""
    from csps.llm import create_engine, make_engine_config

    kw = dict(kw)
    max_len = max(s.prompt_len + s.output_len for s in specs) + kw.get("block_size", 16)
    if kw.get("num_blocks") is None and kw.get("kv_cache_bytes") is None:
        kw["num_blocks"] = blocks_for(specs, kw.get("block_size", 16))
    config = make_engine_config(**{k: v for k, v in kw.items() if k != "max_model_len"})
    try:
        return create_engine(config, max_model_len=max(kw.get("max_model_len") or 0, max_len))
    except (ImportError, NotImplementedError) as e:
        raise CspsError(f"cannot build the engine for sp={config.parallel.sp} tp={config.parallel.tp} "
                        f"({e}); sequence/tensor parallelism may not be available yet") from None


def warm_up(engine) -> None:
    """One short request first, so one-time costs (allocator, kernel selection) stay out of the numbers."""
    from csps.core.sampling_params import SamplingParams

    engine.add_request(list(range(3, 67)), SamplingParams(max_tokens=2, ignore_eos=True), request_id="warmup")
    while engine.has_unfinished():
        engine.step()


def main_real(a) -> int:
    """Every set-up (policy, chunking) on every workload variant, each on a fresh engine of the same config,
    the variants cut from one workload (``csps.bench.variants``)."""
    from csps.bench.report import document, format_table, git_revision, write_json
    from csps.bench.variants import (
        format_long_report,
        long_arrival_report,
        ratio_columns,
        run_name,
        run_setups,
        select,
        workload_variants,
    )
    from csps.cli_args import engine_kwargs
    from csps.llm import make_engine_config

    git = git_revision()  # the code that runs: the tree may change during a long run
    setups, variants = run_setups(a), workload_variants(a)
    lengths = workload_from_args(a, with_ids=False)
    kw = engine_kwargs(a)
    # one budget for every variant: the long prompt alone must be chunked as it is among the others
    kw["token_budget"] = a.token_budget or auto_token_budget(len(lengths), max(s.prompt_len for s in lengths),
                                                             a.block_size)
    model = preset_model_config(a.model)
    max_len = max(s.prompt_len + s.output_len for s in lengths)
    warn_long_context(max_len, model)
    print(f"workload: {len(lengths)} request(s), longest {max_len} tokens; token budget {kw['token_budget']}"
          + ("" if a.token_budget else " (auto; set with --token-budget)"))
    runs, predicted = {}, {}
    for variant in variants:
        for setup in setups:
            name = run_name(setup.name, variant)
            kw.update(schedule_policy=setup.policy, adaptive_chunking=setup.adaptive_chunking,
                      step_time_budget_ms=setup.step_time_budget_ms)
            config = make_engine_config(**{k: v for k, v in kw.items() if k != "max_model_len"})
            if model is not None:  # predict before loading anything
                predicted[name] = check_max_time(select(lengths, variant), config, model, a.max_time, a.model)
            engine = build_engine(kw, lengths)  # sized for the whole workload: one engine config for every variant
            try:
                if model is None:
                    model = engine.model_config
                if name not in predicted:
                    predicted[name] = check_max_time(select(lengths, variant), config, model, a.max_time, a.model)
                print(f"[{name}] predicted {predicted[name][0]:.1f} s by the cost model "
                      f"({predicted[name][1]} profile of this machine)")
                vocab = min(model.vocab_size, engine.tokenizer.vocab_size if engine.tokenizer else model.vocab_size)
                specs = select(workload_from_args(a, engine.tokenizer, vocab), variant)
                warm_up(engine)
                if a.wait_quiet:
                    log.info("waited %.0f s for other jobs to leave the CPU", wait_for_quiet(a.wait_quiet))
                runs[name] = run_real(engine, specs, label=name, progress=not a.no_progress,
                                      peak_flops_per_s=matmul_peak_flops(dtype_bytes(config.dtype)))
                runs[name].summary["predicted_duration_s"] = predicted[name][0]
                runs[name].summary["scheduler"] = {**setup.scheduler_fields(), "token_budget": kw["token_budget"]}
            finally:
                engine.shutdown()
                del engine
    summaries = {name: r.summary for name, r in runs.items()}
    print(format_table({s.name: summaries[s.name] for s in setups}, ratio_of=ratio_columns(setups)))
    report = None
    if len(variants) > 1:
        report = long_arrival_report(summaries, [s.name for s in setups])
        print(format_long_report(report))
    config_doc = {"engine": {**kw, "dtype": config.dtype}, "workload": workload_dict(a), "setups": setups,
                  "variants": variants, "max_time_s": a.max_time, "model_config": model}
    path = a.json or default_json_path("real")
    write_json(path, document("csps bench", config_doc, summaries, git=git,
                              **({"long_arrival": report} if report else {})))
    print(f"results: {path}")
    title = f"{a.model}: {len(lengths)} request(s), token budget {kw['token_budget']}"
    if a.plot:
        from csps.bench.plot import plot_timeline

        plot_timeline({s.name: runs[s.name].steps for s in setups}, a.plot, title=title)
        print(f"plot: {a.plot}")
    if a.plot_tbt:
        from csps.bench.plot import plot_tbt, tbt_series

        without = {s.name: summaries.get(run_name(s.name, "without-long")) for s in setups}
        plot_tbt({s.name: tbt_series(runs[s.name].requests, runs[s.name].origin_s,
                                     without[s.name]["tbt_s"]["p99"] if without[s.name] else None)
                  for s in setups}, a.plot_tbt, title=title)
        print(f"TBT plot: {a.plot_tbt}")
    return 0
