"""The engine core: schedule a step, run it, sample, stream outputs.

``Engine.add_request / step / abort`` is the step-level API the HTTP server drives; ``csps.LLM``
wraps it for offline use. One engine for every layout: this process is rank 0 of a world of
SP × TP ranks (world size 1 included, where the groups are groups of one and nothing moves). Rank 0
owns the scheduler, the KV block pools and the requests; each step it sends every rank its own plan
(``csps.core.plan``), runs its own share on its ``RankRuntime``, gathers the hidden states of the tokens
to sample, and samples. A rank that fails reports its error; rank 0 raises one clear ``CspsError``
naming it and refuses further steps.
"""

from __future__ import annotations

import itertools
import logging
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from csps.config import EngineConfig
from csps.core.kv_cache import BlockPool, KVCacheManager
from csps.core.plan import StepPlan
from csps.core.plan_builder import PlanBuilder, sample_order
from csps.core.request import Request, Status
from csps.core.sampling_params import SamplingParams
from csps.core.scheduler import Scheduler, SchedulerOutput
from csps.device import device_profile, kv_cache_budget_bytes
from csps.dtypes import dtype_bytes, torch_dtype
from csps.engine.exchange import ExchangePolicy
from csps.engine.outputs import OutputState, RequestOutput
from csps.engine.rank_runtime import BYTE_KINDS, RankRuntime, sample_shapes
from csps.engine.rank_world import RankWorld, check_layout
from csps.engine.sampler import RequestSampler, SampleRow, sample
from csps.engine.structured import StructuredDecoding
from csps.engine.tokenizer import Tokenizer, load_tokenizer
from csps.engine.weights import load_model_weights, memory_available_bytes
from csps.errors import CspsError, RequestError
from csps.perf.step_timer import StepTimer

log = logging.getLogger("csps.engine")


@dataclass
class StepRecord:
    step_id: int
    start_s: float
    duration_s: float
    num_prefill_tokens: int
    num_decode_tokens: int
    num_seqs: int
    num_preempted: int
    bytes_by_kind: dict[str, int] = field(default_factory=dict)
    kv_blocks_used: tuple[int, ...] = ()  # per SP rank, once the step's blocks were allocated


# Called after every non-empty step with what the scheduler decided and what the step took: how the
# benchmark and simulator tools watch the engine (nothing patches it).
StepObserver = Callable[[SchedulerOutput, StepRecord], None]


def size_kv_pool(cfg: EngineConfig, kv_bytes_per_token: int, max_model_len: int, weight_bytes_per_rank: int = 0) -> int:
    """Number of KV blocks per rank: explicit, or from a memory budget, capped by what can be used."""
    bs = cfg.cache.block_size
    if cfg.cache.num_blocks is not None:
        return cfg.cache.num_blocks
    budget = cfg.cache.kv_cache_bytes
    if budget is None:
        budget = kv_cache_budget_bytes(cfg.device, weight_bytes_per_rank, memory_available_bytes())
    blocks = max(2, budget // (kv_bytes_per_token * bs))
    # never more than the running requests could fill (nor 64 full contexts)
    usable = -(-min(cfg.scheduler.max_num_seqs, 64) * max_model_len // bs) + 1
    return int(min(blocks, usable))


def kv_pool_blocks(config: EngineConfig, model_cfg) -> int:
    """Blocks per rank, identical on every rank (a TP rank holds its share of the KV heads)."""
    e = dtype_bytes(config.dtype)
    per_token = model_cfg.kv_bytes_per_token(e, config.parallel.tp)
    return size_kv_pool(config, per_token, config.scheduler.max_model_len, model_cfg.num_params() * e // config.parallel.tp)


class Engine:
    def __init__(self, config: EngineConfig, tokenizer: Tokenizer | None = None,
                 weights: tuple | None = None, load_tokenizer_: bool = True) -> None:
        """``weights``: a preloaded (ModelConfig, state dict); ``load_tokenizer_=False`` runs on
        token ids only (no text), e.g. for models built in tests."""
        self.config = config
        self.dtype = torch_dtype(config.dtype)
        torch.manual_seed(config.seed)
        t0 = time.perf_counter()
        model_cfg, state_dict = weights or load_model_weights(config.model, self.dtype, seed=config.seed)
        self.model_config = model_cfg
        self.max_model_len = config.scheduler.max_model_len
        if tokenizer is None and load_tokenizer_:
            hf_tokenizer = load_tokenizer(config.model)
            tokenizer = Tokenizer(hf_tokenizer) if hf_tokenizer is not None else None
        self.tokenizer = tokenizer
        self.eos_ids = set(model_cfg.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None and not config.model.startswith("dummy:"):
            self.eos_ids.add(tokenizer.eos_token_id)
        self.num_sp_ranks = config.parallel.sp
        num_blocks = kv_pool_blocks(config, model_cfg)
        self._start_ranks(model_cfg, state_dict, num_blocks)
        del state_dict
        self.pools = [BlockPool(num_blocks, config.cache.block_size, config.cache.enable_prefix_caching)
                      for _ in range(self.num_sp_ranks)]
        self.kvs = [KVCacheManager(p) for p in self.pools]
        self.step_timer = self._make_step_timer() if config.scheduler.adaptive_chunking else None
        self.scheduler = Scheduler(config.scheduler, self.kvs,
                                   config.parallel.sp_threshold_tokens if self.num_sp_ranks > 1 else None,
                                   self.step_timer)
        self.plans = PlanBuilder(self.kvs, config.cache.block_size, self.exchange.choose if self.exchange else None)
        self.states: dict[str, OutputState] = {}
        self.samplers: dict[str, RequestSampler] = {}  # per request: its seed's generator, penalty state
        self.structured = StructuredDecoding(tokenizer, model_cfg.vocab_size, self.eos_ids)  # grammars, masks
        self.step_log: deque[StepRecord] = deque(maxlen=100_000)
        self.logits_sink: dict[str, list[torch.Tensor]] | None = None  # tests: capture sampled logits
        self.step_observers: list[StepObserver] = []
        self._ids = itertools.count()
        self.load_time_s = time.perf_counter() - t0
        p = config.parallel
        log.info("engine ready: model %s (%s), layout sp=%d x tp=%d, KV cache %d tokens per rank, "
                 "token budget %d per rank, loaded in %.1f s", model_cfg.name or config.model, config.dtype,
                 p.sp, p.tp, self.kv_capacity_tokens, config.scheduler.token_budget, self.load_time_s)

    def _start_ranks(self, model_cfg, state_dict, num_blocks: int) -> None:
        """Start ranks 1..W-1 (none at world size 1), then build rank 0's own runtime."""
        check_layout(self.config, model_cfg)
        self._world = RankWorld()
        self._finalizer = weakref.finalize(self, self._world.close)  # stops the ranks when we are dropped
        self._world.start(self.config, model_cfg, state_dict, num_blocks)
        self.rt = RankRuntime(self.config, (model_cfg, state_dict), num_blocks)
        self._world.world = self.rt.groups.control  # the shutdown plan goes where plans go
        self.model, self.cache = self.rt.model, self.rt.cache
        try:
            link = self.rt.handshake()
        except Exception as e:  # noqa: BLE001
            raise self._failure(e) from None
        p = self.config.parallel
        forced = "ulysses" if p.sp_attn == "ulysses" else (None if p.sp_exchange == "auto" else p.sp_exchange)
        self.exchange = None  # only sequence-parallel chunks choose an exchange
        if p.sp > 1:
            profile = device_profile(self.config.device, dtype_bytes(self.config.dtype), link)
            self.exchange = ExchangePolicy.calibrate(model_cfg, dtype_bytes(self.config.dtype), p.sp, p.tp, profile,
                                                     forced)
        self._last_bytes: dict[str, int] = {}

    def _make_step_timer(self) -> StepTimer:
        """The cost model on this machine's probed profile (cached per machine), for adaptive chunking."""
        p = self.config.parallel
        profile = self.exchange.profile if self.exchange is not None else device_profile(
            self.config.device, dtype_bytes(self.config.dtype))
        budget = self.config.scheduler.step_time_budget_ms
        log.info("prefill chunks sized to a step time budget of %s (cost model on %s, corrected by measured steps)",
                 f"{budget:g} ms" if budget else "the decodes plus the fresh chunk the token budget leaves them", profile.name)
        return StepTimer(self.model_config, profile, dtype_bytes(self.config.dtype), num_sp_ranks=p.sp, tp=p.tp,
                         exchange="ulysses" if p.sp_attn == "ulysses" else "auto")

    @property
    def rank_group(self):
        """The local rank processes (None at world size 1 and under torchrun)."""
        return self._world.rank_group

    @property
    def dead(self) -> str | None:
        return self._world.dead

    # -- requests --------------------------------------------------------------------------
    @property
    def kv_capacity_tokens(self) -> int:
        """KV capacity of one rank, in tokens."""
        return self.pools[0].capacity_tokens

    @property
    def total_kv_capacity_tokens(self) -> int:
        return sum(p.capacity_tokens for p in self.pools)

    def validate_prompt(self, prompt_ids: list[int], params: SamplingParams) -> None:
        n = len(prompt_ids)
        if n == 0:
            raise RequestError("the prompt is empty", "prompt")
        if n >= self.max_model_len:
            raise RequestError(
                f"the prompt has {n} tokens but the model's context is {self.max_model_len} tokens "
                "(it must leave room for at least one generated token)", "prompt")
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", "prompt")
        need = min(n + params.max_tokens, self.max_model_len)
        if need > self.total_kv_capacity_tokens:
            raise RequestError(
                f"the request needs up to {need} tokens of KV cache but the cache holds "
                f"{self.total_kv_capacity_tokens} tokens; lower max_tokens or enlarge the KV cache")

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, arrival_s: float | None = None) -> str:
        params = params or SamplingParams()
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("this engine has no tokenizer: pass token ids")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
        self.validate_prompt(ids, params)
        req_id = request_id if request_id is not None else str(next(self._ids))
        if req_id in self.states:
            raise RequestError(f"request id {req_id!r} is already in use")
        if params.structured_outputs is not None:
            self.structured.attach(req_id, params.structured_outputs)
        req = Request(req_id, ids, params, arrival_s if arrival_s is not None else time.perf_counter())
        self.states[req_id] = OutputState(req, self.tokenizer, self.eos_ids, self.max_model_len)
        self.samplers[req_id] = RequestSampler(
            torch.Generator(self.rt.device).manual_seed(params.seed) if params.seed is not None else None)
        self.scheduler.add(req)
        return req_id

    def abort(self, req_id: str) -> bool:
        """Stop a request now and free its KV blocks. False if it is unknown or already done."""
        req = self.scheduler.finish(req_id, Status.FINISHED_ABORTED)
        self.plans.forget(req_id)
        self.states.pop(req_id, None)
        self.samplers.pop(req_id, None)
        self.structured.drop(req_id)
        return req is not None

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0

    # -- the step --------------------------------------------------------------------------
    def _failure(self, e: BaseException) -> CspsError:
        self._world.dead = self._world.first_error() or f"rank 0 failed: {type(e).__name__}: {e}"
        log.error("engine failed: %s", self.dead)
        self._finalizer()
        return CspsError(f"the engine's ranks failed ({self.dead.splitlines()[0]})")

    def execute(self, plans: list[StepPlan]) -> torch.Tensor | None:
        """Runs one step's plans (one per SP rank) on every rank; logits [num_sampled, V] fp32 in
        the order of ``sample_order(plans)``, or None if nothing is sampled."""
        if self.dead:
            raise CspsError(f"the engine is dead: {self.dead.splitlines()[0]}")
        if not self._finalizer.alive:
            raise CspsError("the engine was shut down")
        g, tp = self.rt.groups, self.config.parallel.tp
        try:
            if g.world_size > 1:  # every world rank gets its SP rank's plan (TP peers the same one)
                blobs = [p.to_bytes() for p in plans]
                g.control.scatter_bytes([blobs[w // tp] for w in range(g.world_size)], src=0, kind="plan")
            hidden = self.rt.execute(plans[0])
            parts = g.world.gather_to(hidden, dst=0, kind="sample",
                                      shapes=sample_shapes(plans, tp, self.model_config.hidden_size))
            stats = g.control.gather_to(self.rt.step_bytes_tensor(), dst=0, kind="stats",
                                        shapes=[(len(BYTE_KINDS),)] * g.world_size)
        except Exception as e:  # noqa: BLE001 - a rank failed mid-step
            raise self._failure(e) from None
        total = torch.stack(stats).sum(0).tolist()
        self._last_bytes = {k: int(v) for k, v in zip(BYTE_KINDS, total) if v}
        rows = [x for x in parts if x.numel()]
        return self.model.logits(torch.cat(rows)) if rows else None

    def step(self) -> list[RequestOutput]:
        out = self.scheduler.schedule()
        if out.empty:
            return []
        t0 = time.perf_counter()
        kv_used = tuple(p.num_used for p in self.pools)
        for c in out.chunks:
            req = self.scheduler.requests[c.req_id]
            if req.metrics.first_scheduled_s is None:
                req.metrics.first_scheduled_s = t0
        plans = self.plans.build(out, self.scheduler.requests)
        logits = self.execute(plans)
        self.scheduler.complete_step(out)
        outputs = self._process_samples(out, logits, sample_order(plans)) + self._finish_unsampled(out)
        t1 = time.perf_counter()
        if self.step_timer is not None and out.num_prefill_tokens:
            self.step_timer.observe(*out.items(self.num_sp_ranks), t1 - t0)
        record = StepRecord(out.step_id, t0, t1 - t0, out.num_prefill_tokens, out.num_decode_tokens,
                            len(out.chunks), len(out.preempted), self.step_bytes(), kv_used)
        self.step_log.append(record)
        for observe in self.step_observers:
            observe(out, record)
        return outputs

    def step_bytes(self) -> dict[str, int]:
        """Bytes moved between ranks in the last step, by kind (empty at world size 1)."""
        return dict(self._last_bytes)

    def _process_samples(self, out: SchedulerOutput, logits: torch.Tensor | None,
                         order: list[str]) -> list[RequestOutput]:
        chunks = [c for c in out.chunks if c.samples]
        if not chunks:
            return []
        if order != [c.req_id for c in chunks]:  # gathered rank by rank: back to the scheduler's order
            index = {req_id: i for i, req_id in enumerate(order)}
            logits = logits[[index[c.req_id] for c in chunks]]
        rows = []
        for c in chunks:
            req = self.scheduler.requests[c.req_id]
            rows.append(SampleRow(req.params, req.prompt_token_ids, req.output_token_ids, self.samplers[c.req_id]))
        if self.logits_sink is not None:
            for c, row in zip(chunks, logits):
                self.logits_sink.setdefault(c.req_id, []).append(row.clone())
        self.structured.apply(logits, [c.req_id for c in chunks])  # grammar masks (no-op without grammars)
        sampled = sample(logits, rows)
        now = time.perf_counter()
        outputs = []
        for c, s in zip(chunks, sampled):
            state = self.states[c.req_id]
            state.req.metrics.token_times_s.append(now)
            status = state.add_token(s)
            if self.structured.consume(c.req_id, s.token_id):  # the grammar is complete
                status = Status.FINISHED_STOPPED
            outputs.append(state.make_output(False, None) if status is None else self._finish(c.req_id, status, now))
        return outputs

    def _finish_unsampled(self, out: SchedulerOutput) -> list[RequestOutput]:
        """Requests whose known tokens are all computed but that want no token (max_tokens 0: prefill
        only) finish with none; their prompt's full blocks stay in the prefix cache."""
        done = [c.req_id for c in out.chunks if not c.samples and c.req_id in self.scheduler.requests
                and self.scheduler.requests[c.req_id].num_missing_tokens == 0]
        now = time.perf_counter()
        return [self._finish(req_id, Status.FINISHED_LENGTH, now) for req_id in done]

    def _finish(self, req_id: str, status: Status, now: float) -> RequestOutput:
        state = self.states.pop(req_id)
        state.req.metrics.finished_s = now
        self.scheduler.finish(req_id, status)
        self.plans.forget(req_id)
        self.samplers.pop(req_id, None)
        self.structured.drop(req_id)
        return state.make_output(True, status)

    # -- introspection (metrics, benchmarks) -----------------------------------------------
    def stats(self) -> dict:
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "kv_blocks_used": [p.num_used for p in self.pools],
            "kv_blocks_peak": [p.peak_used for p in self.pools],
            "kv_blocks_total": [p.num_blocks - 1 for p in self.pools],
            "prefix_cache_hit_rate": self.scheduler.prefix_cache_hit_rate,
        }

    def shutdown(self) -> None:
        """Stop the ranks now (also done when the engine is dropped or the interpreter exits)."""
        self._finalizer()
