"""The engine core: schedule a step, run it, sample, stream outputs.

``Engine.add_request / step / abort`` is the step-level API the HTTP server drives; ``csps.LLM``
wraps it for offline use. Rank 0 owns the scheduler, the KV block pools and the requests; ranks
only execute step plans (see ``csps.plan``).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from csps.attn_context import KVCacheTensors
from csps.config import EngineConfig
from csps.errors import RequestError
from csps.kv_cache import BlockPool, KVCacheManager
from csps.model import LlamaModel, TPShard
from csps.outputs import OutputState, RequestOutput
from csps.plan import SeqWork, StepPlan
from csps.request import Request, Status
from csps.sampler import SampleRow, sample
from csps.sampling_params import SamplingParams
from csps.scheduler import Scheduler, SchedulerOutput
from csps.tokenizer import Tokenizer, load_tokenizer
from csps.weights import load_model_weights, memory_available_bytes
from csps.worker import Worker

log = logging.getLogger("csps.engine")

TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


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


def size_kv_pool(cfg: EngineConfig, kv_bytes_per_token: int, max_model_len: int) -> int:
    """Number of KV blocks per rank: explicit, or from a memory budget, capped by what can be used."""
    bs = cfg.cache.block_size
    if cfg.cache.num_blocks is not None:
        return cfg.cache.num_blocks
    budget = cfg.cache.kv_cache_bytes
    if budget is None:
        budget = min(2 << 30, memory_available_bytes() // 4)
    blocks = max(2, budget // (kv_bytes_per_token * bs))
    # never more than the running requests could fill (nor 64 full contexts)
    usable = -(-min(cfg.scheduler.max_num_seqs, 64) * max_model_len // bs) + 1
    return int(min(blocks, usable))


def kv_pool_blocks(config: EngineConfig, model_cfg) -> int:
    """Blocks per rank, identical on every rank (a TP rank holds its share of the KV heads)."""
    tp = config.parallel.tp
    kv_heads = max(b - a for a, b in (TPShard(r, tp).kv_head_range(model_cfg.num_heads, model_cfg.num_kv_heads)
                                      for r in range(tp)))
    elem_bytes = torch.finfo(TORCH_DTYPES[config.dtype]).bits // 8
    per_token = 2 * model_cfg.num_layers * kv_heads * model_cfg.head_dim * elem_bytes
    return size_kv_pool(config, per_token, config.scheduler.max_model_len)


class Engine:
    def __init__(self, config: EngineConfig, tokenizer: Tokenizer | None = None,
                 weights: tuple | None = None, load_tokenizer_: bool = True) -> None:
        """``weights``: a preloaded (ModelConfig, state dict); ``load_tokenizer_=False`` runs on
        token ids only (no text), e.g. for models built in tests."""
        self.config = config
        self.dtype = TORCH_DTYPES[config.dtype]
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
        # KV bytes per token on one rank (a TP rank holds its share of the KV heads)
        num_blocks = kv_pool_blocks(config, model_cfg)
        self._start_runtime(model_cfg, state_dict, num_blocks)
        del state_dict
        self.pools = [BlockPool(num_blocks, config.cache.block_size, config.cache.enable_prefix_caching)
                      for _ in range(self.num_sp_ranks)]
        self.pool = self.pools[0]
        self.kvs = [KVCacheManager(p) for p in self.pools]
        self.kv = self.kvs[0]
        self.scheduler = Scheduler(config.scheduler, self.kvs,
                                   config.parallel.sp_threshold_tokens if self.num_sp_ranks > 1 else None)
        self.states: dict[str, OutputState] = {}
        self.generators: dict[str, torch.Generator] = {}
        self.step_log: deque[StepRecord] = deque(maxlen=100_000)
        self.logits_sink: dict[str, list[torch.Tensor]] | None = None  # tests: capture sampled logits
        self._ids = itertools.count()
        self.load_time_s = time.perf_counter() - t0
        p = config.parallel
        log.info("engine ready: model %s (%s), layout sp=%d x tp=%d, KV cache %d tokens per rank, "
                 "token budget %d per rank, loaded in %.1f s", model_cfg.name or config.model, config.dtype,
                 p.sp, p.tp, self.kv_capacity_tokens, config.scheduler.token_budget, self.load_time_s)

    def _start_runtime(self, model_cfg, state_dict, num_blocks: int) -> None:
        """Single process: the model and the KV cache live here."""
        self.model = LlamaModel(model_cfg, state_dict, self.dtype)
        self.cache = KVCacheTensors(model_cfg.num_layers, num_blocks, self.config.cache.block_size,
                                    model_cfg.num_kv_heads, model_cfg.head_dim, self.dtype)
        self.worker = Worker(self.model, self.cache)

    # -- requests --------------------------------------------------------------------------
    @property
    def kv_capacity_tokens(self) -> int:
        """KV capacity of one rank, in tokens."""
        return self.pool.capacity_tokens

    @property
    def total_kv_capacity_tokens(self) -> int:
        return sum(p.capacity_tokens for p in self.pools)

    def validate_prompt(self, prompt_ids: list[int], params: SamplingParams) -> None:
        n = len(prompt_ids)
        if n == 0:
            raise RequestError("the prompt is empty")
        if n >= self.max_model_len:
            raise RequestError(
                f"the prompt has {n} tokens but the model's context is {self.max_model_len} tokens "
                "(it must leave room for at least one generated token)")
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
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
        req = Request(req_id, ids, params, arrival_s if arrival_s is not None else time.perf_counter())
        self.states[req_id] = OutputState(req, self.tokenizer, self.eos_ids, self.max_model_len)
        if params.seed is not None:
            self.generators[req_id] = torch.Generator().manual_seed(params.seed)
        self.scheduler.add(req)
        return req_id

    def abort(self, req_id: str) -> bool:
        """Stop a request now and free its KV blocks. False if it is unknown or already done."""
        req = self.scheduler.finish(req_id, Status.FINISHED_ABORTED)
        self.states.pop(req_id, None)
        self.generators.pop(req_id, None)
        return req is not None

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0

    # -- the step --------------------------------------------------------------------------
    def build_plan(self, out: SchedulerOutput) -> StepPlan:
        plan = StepPlan(step_id=out.step_id)
        for c in out.chunks:
            req = self.scheduler.requests[c.req_id]
            plan.seqs.append(SeqWork(
                req_id=c.req_id,
                token_ids=req.token_ids(c.start, c.start + c.num_tokens),
                pos=[(c.start, c.start + c.num_tokens)],
                block_ids=self.kv.table(c.req_id),
                num_kv_before=c.start,
                is_decode=c.is_decode,
                sample=c.samples,
            ))
        return plan

    def execute(self, plan: StepPlan) -> torch.Tensor | None:
        return self.worker.execute(plan)

    def step(self) -> list[RequestOutput]:
        out = self.scheduler.schedule()
        if out.empty:
            return []
        t0 = time.perf_counter()
        for c in out.chunks:
            req = self.scheduler.requests[c.req_id]
            if req.metrics.first_scheduled_s is None:
                req.metrics.first_scheduled_s = t0
        plan = self.build_plan(out)
        logits = self.execute(plan)
        self.scheduler.complete_step(out)
        outputs = self._process_samples(out, logits)
        t1 = time.perf_counter()
        self.step_log.append(StepRecord(out.step_id, t0, t1 - t0, out.num_prefill_tokens,
                                        out.num_decode_tokens, len(out.chunks), len(out.preempted),
                                        self.step_bytes()))
        return outputs

    def step_bytes(self) -> dict[str, int]:
        return {}

    def _process_samples(self, out: SchedulerOutput, logits: torch.Tensor | None) -> list[RequestOutput]:
        chunks = [c for c in out.chunks if c.samples]
        if not chunks:
            return []
        rows = []
        for c in chunks:
            req = self.scheduler.requests[c.req_id]
            rows.append(SampleRow(req.params, req.prompt_token_ids, req.output_token_ids,
                                  self.generators.get(c.req_id)))
        if self.logits_sink is not None:
            for c, row in zip(chunks, logits):
                self.logits_sink.setdefault(c.req_id, []).append(row.clone())
        sampled = sample(logits, rows)
        now = time.perf_counter()
        outputs = []
        for c, s in zip(chunks, sampled):
            state = self.states[c.req_id]
            state.req.metrics.token_times_s.append(now)
            status = state.add_token(s)
            if status is not None:
                state.req.metrics.finished_s = now
                self.scheduler.finish(c.req_id, status)
                self.states.pop(c.req_id, None)
                self.generators.pop(c.req_id, None)
            outputs.append(state.make_output(status is not None, status))
        return outputs

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
        pass
