"""Virtual-clock simulation: the REAL scheduler driven by cost-model step times.

Each step, ``Scheduler.schedule()`` (the same packer the engine runs, one ``KVCacheManager`` per SP
rank sized from the hardware profile's memory) decides the step's chunks; their shape goes to
``cost_model.predict_step``; the virtual clock advances by the predicted time; every sampled request
gets a (fake) token stamped with the clock. Request metrics are ``RequestMetrics`` as in the
engine, so a simulated run is summarized exactly like a real one (``bench_report.summarize_run``).

A ``Strategy`` is one way to use the GPUs:
  * Sarathi-Serve: all devices one TP group, chunked prefills, a long prompt's chunks one after
    another on that group (sp=1, tp=gpus);
  * csps: SP ranks (each a TP group of tp devices), a long prompt's every chunk spread zigzag over
    all SP ranks, prefill exchange pass-KV (ring), pass-Q, Ulysses or Meta's rule (auto); decodes
    of distributed requests move Q to the KV (pass-Q) or, as the baseline, the KV to the query
    (``decode="move_kv"``: the step carries a one-token pass-KV ring over the whole context).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from csps.bench.report import RequestSample, StepSample, summarize_run
from csps.bench.workloads import RequestSpec
from csps.config import ModelConfig, SchedulerConfig
from csps.core.kv_cache import BlockPool, KVCacheManager
from csps.core.request import Request, Status
from csps.core.sampling_params import SamplingParams
from csps.core.scheduler import Scheduler, SchedulerOutput
from csps.errors import CspsError
from csps.perf.cost_model import EXCHANGES, StepShape, predict_step
from csps.perf.hardware import HardwareProfile
from csps.perf.step_timer import StepTimer

DECODE_MODES = ("pass_q", "move_kv")
FAKE_TOKEN_ID = 3
MEM_FRACTION = 0.9  # of device memory for weights + KV (the rest: activations, workspace)


@dataclass(frozen=True)
class Strategy:
    name: str
    sp: int = 1  # SP ranks
    tp: int = 1  # devices per SP rank (one TP group)
    exchange: str = "pass_kv"  # prefill exchange of SP chunks: pass_kv | pass_q | ulysses | auto
    decode: str = "pass_q"  # decode of SP requests: pass_q | move_kv
    policy: str = "stall-free"  # stall-free | prefill-first
    token_budget: int = 512  # tokens per SP rank per step
    sp_threshold_tokens: int | None = 4096  # longer prompts are sequence-parallel
    adaptive_chunking: bool = True  # prefill chunks sized to a step time budget, as the engine does
    step_time_budget_ms: float | None = None  # None: the decodes plus the fresh chunk the token budget leaves them

    def __post_init__(self) -> None:
        if self.sp < 1 or self.tp < 1:
            raise CspsError(f"strategy {self.name}: sp and tp must be >= 1")
        if self.exchange not in EXCHANGES:
            raise CspsError(f"strategy {self.name}: unknown exchange {self.exchange!r}")
        if self.decode not in DECODE_MODES:
            raise CspsError(f"strategy {self.name}: unknown decode mode {self.decode!r} ({' | '.join(DECODE_MODES)})")
        if self.decode == "move_kv" and self.exchange != "pass_kv":
            raise CspsError(f"strategy {self.name}: decode by moving KV is modelled as a pass-KV ring")

    @property
    def num_devices(self) -> int:
        return self.sp * self.tp


def standard_strategies(gpus: int, *, tp: int = 1, token_budget: int = 512, policy: str = "stall-free",
                        sp_threshold_tokens: int = 4096, num_kv_heads: int | None = None) -> list[Strategy]:
    """The strategies compared side by side: Sarathi-Serve (TP over all GPUs) and csps variants with
    gpus/tp SP ranks of tp devices each. Ulysses only where its degree is at most the KV heads per TP
    group (beyond, KV heads must be replicated, which the cost model's all-to-all does not count)."""
    if gpus < 1 or tp < 1 or gpus % tp:
        raise CspsError(f"--gpus ({gpus}) must be a positive multiple of --tp ({tp})")
    kw = dict(policy=policy, token_budget=token_budget, sp_threshold_tokens=sp_threshold_tokens)
    out = [Strategy(f"sarathi-tp{gpus}", sp=1, tp=gpus, **kw)]
    sp = gpus // tp
    if sp > 1:
        sfx = f"sp{sp}" + (f"tp{tp}" if tp > 1 else "")
        out += [Strategy(f"csps-{sfx}-passkv", sp=sp, tp=tp, exchange="pass_kv", **kw),
                Strategy(f"csps-{sfx}-auto", sp=sp, tp=tp, exchange="auto", **kw),
                Strategy(f"csps-{sfx}-kv-decode", sp=sp, tp=tp, exchange="pass_kv", decode="move_kv", **kw)]
        if num_kv_heads is None or sp * tp <= num_kv_heads:
            out.append(Strategy(f"ulysses-{sfx}", sp=sp, tp=tp, exchange="ulysses", **kw))
    return out


def kv_bytes_per_block(model: ModelConfig, dtype_bytes: int, block_size: int, tp: int = 1) -> int:
    """One KV block's bytes on one device (a TP group splits the KV heads, replicating below one each)."""
    return block_size * model.kv_bytes_per_token(dtype_bytes, tp)


def kv_tokens_per_rank(model: ModelConfig, hw: HardwareProfile, tp: int, dtype_bytes: int) -> int:
    """KV tokens one SP rank (tp devices) holds: device memory left after its weight shard."""
    weights_per_device = model.num_params() * dtype_bytes / tp
    free = hw.mem_bytes * MEM_FRACTION - weights_per_device
    per_token = model.kv_bytes_per_token(dtype_bytes, tp)  # KV heads replicated when tp > num_kv_heads
    if free <= per_token:
        raise CspsError(f"{model.name or 'the model'} does not fit {hw.name} with tp={tp}: "
                        f"{weights_per_device / 2**30:.1f} GiB of weights per device")
    return int(free // per_token)


@dataclass
class SimRun:
    strategy: Strategy
    summary: dict
    steps: list[StepSample] = field(default_factory=list)
    requests: list[RequestSample] = field(default_factory=list)


def step_shape(out: SchedulerOutput, num_ranks: int, strategy: Strategy) -> StepShape:
    prefills, decodes = out.items(num_ranks)
    if strategy.decode == "move_kv":  # the KV comes to the query: a one-token pass-KV ring
        prefills += tuple((1, ctx - 1, degree) for ctx, degree in decodes if degree > 1)
        decodes = tuple(d for d in decodes if d[1] == 1)
    return StepShape(prefills=prefills, decodes=decodes, exchange=strategy.exchange, tp=strategy.tp,
                     num_sp_ranks=num_ranks)


def _scheduler(specs: list[RequestSpec], strategy: Strategy, model: ModelConfig, hw: HardwareProfile,
               dtype_bytes: int, block_size: int, max_num_seqs: int) -> Scheduler:
    max_len = max(s.prompt_len + s.output_len for s in specs)
    per_rank = kv_tokens_per_rank(model, hw, strategy.tp, dtype_bytes)
    need_blocks = sum(-(-(s.prompt_len + s.output_len) // block_size) for s in specs)
    need_blocks += need_blocks // 50 + 8  # the scheduler's 1% admission watermark
    usable = min(per_rank // block_size, need_blocks) + 1  # no more blocks than the workload can use
    if max_len > per_rank * strategy.sp:
        raise CspsError(f"a {max_len}-token request needs more KV than {strategy.name} holds "
                        f"({per_rank * strategy.sp} tokens on {strategy.num_devices} {hw.name})")
    kvs = [KVCacheManager(BlockPool(max(2, usable), block_size, enable_prefix_caching=False))
           for _ in range(strategy.sp)]
    budget = max(block_size, strategy.token_budget - strategy.token_budget % block_size)
    cfg = SchedulerConfig(token_budget=budget, max_num_seqs=max_num_seqs, max_model_len=max_len,
                          policy=strategy.policy, adaptive_chunking=strategy.adaptive_chunking,
                          step_time_budget_ms=strategy.step_time_budget_ms)
    timer = StepTimer(model, hw, dtype_bytes, num_sp_ranks=strategy.sp, tp=strategy.tp, exchange=strategy.exchange)
    return Scheduler(cfg, kvs, sp_threshold_tokens=strategy.sp_threshold_tokens if strategy.sp > 1 else None,
                     step_timer=timer)


def simulate(specs: list[RequestSpec], strategy: Strategy, model: ModelConfig, hw: HardwareProfile,
             dtype_bytes: int = 2, *, block_size: int = 16, max_num_seqs: int = 256,
             max_steps: int = 2_000_000, progress: bool = False) -> SimRun:
    """Run the workload on a virtual clock; returns the same summary as a real run."""
    if not specs:
        raise CspsError("nothing to simulate: the workload is empty")
    sched = _scheduler(specs, strategy, model, hw, dtype_bytes, block_size, max_num_seqs)
    pending = sorted(specs, key=lambda s: s.arrival_s)
    reqs: list[tuple[Request, RequestSpec]] = []
    steps: list[StepSample] = []
    clock, nxt = 0.0, 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(s.prompt_len + s.output_len for s in specs), unit="tok", desc=strategy.name,
                   leave=False)
    try:
        while nxt < len(pending) or sched.num_unfinished:
            while nxt < len(pending) and pending[nxt].arrival_s <= clock:
                spec = pending[nxt]
                req = Request(str(nxt), [FAKE_TOKEN_ID] * spec.prompt_len,
                                         SamplingParams(max_tokens=spec.output_len, ignore_eos=True), spec.arrival_s)
                sched.add(req)
                reqs.append((req, spec))
                nxt += 1
            out = sched.schedule() if sched.num_unfinished else None
            if out is None or out.empty:
                if nxt < len(pending):
                    clock = max(clock, pending[nxt].arrival_s)
                    continue
                raise CspsError(f"{strategy.name}: the scheduler cannot make progress (KV cache too small?)")
            if len(steps) >= max_steps:
                raise CspsError(f"{strategy.name}: more than {max_steps} steps; shorten the workload")
            used = tuple(kv.pool.num_used for kv in sched.kvs)
            for c in out.chunks:
                m = sched.requests[c.req_id].metrics
                if m.first_scheduled_s is None:
                    m.first_scheduled_s = clock
            cost = predict_step(step_shape(out, sched.num_ranks, strategy), model, hw, dtype_bytes)
            start, clock = clock, clock + cost.total_s
            sched.complete_step(out)
            for c in out.chunks:
                if not c.samples:
                    continue
                req = sched.requests[c.req_id]
                req.output_token_ids.append(FAKE_TOKEN_ID)
                req.metrics.token_times_s.append(clock)
                if len(req.output_token_ids) >= req.params.max_tokens:
                    req.metrics.finished_s = clock
                    sched.finish(c.req_id, Status.FINISHED_LENGTH)
            steps.append(StepSample(start, cost.total_s, out.num_prefill_tokens, out.num_decode_tokens,
                                    len(out.chunks), cost.flops, dict(cost.bytes_by_kind), used))
            if bar is not None:
                bar.update(out.num_tokens)
    finally:
        if bar is not None:
            bar.close()
    samples = [RequestSample(s.prompt_len, len(r.output_token_ids), r.metrics, s.tag) for r, s in reqs]
    summary = summarize_run(samples, steps, peak_flops_per_s=hw.peak_flops_for(dtype_bytes) * strategy.num_devices,
                            kv_bytes_per_block=kv_bytes_per_block(model, dtype_bytes, block_size, strategy.tp),
                            num_ranks=strategy.sp)
    summary["strategy"] = {k: getattr(strategy, k) for k in strategy.__dataclass_fields__}
    summary["hardware"] = hw.name
    return SimRun(strategy, summary, steps, samples)


def compare(specs: list[RequestSpec], strategies: list[Strategy], model: ModelConfig, hw: HardwareProfile,
            dtype_bytes: int = 2, **kw) -> dict[str, SimRun]:
    """Every strategy on the same workload, by name (the columns of the side-by-side table)."""
    return {s.name: simulate(specs, s, model, hw, dtype_bytes, **kw) for s in strategies}
