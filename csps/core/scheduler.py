"""Sarathi-Serve's stall-free batching over SP ranks, as a pure-Python packer (no torch).

Each step, within a token budget *per rank*:
  1. every running decode (one token each, on the rank that will hold its KV) — decodes are never
     paused for a prefill;
  2. the next chunk of each partly prefilled prompt;
  3. new requests (FCFS), while KV blocks are free and budget is left.
Chunks are multiples of the block size except the one that ends a prompt. KV blocks are allocated
incrementally, per step, in each rank's own pool. When a pool is full, the most recently admitted
request holding blocks there is preempted (freed; recomputed later, producing the same tokens).

Placement (``kv_placement``): a short request lives on one rank (the one with the longest cached
prefix, else the least loaded). A long one (prompt above ``sp_threshold_tokens``, or KV too big
for one rank) is sequence-parallel: each of its chunks is spread zigzag over all SP ranks, so one
step's prefill spans every rank while each rank's share stays within its budget.

Adaptive chunking (Medha): with a step timer (the cost model, given by the engine or the simulator)
each prefill chunk of a step that carries decodes is also the largest whole number of blocks whose
step stays within a time budget — fixed, or by default the predicted time of the step's decodes plus
the fresh chunk the token budget leaves them, so a chunk on top of a long cache is cut to cost what a
fresh chunk costs. The first prefill of a step always gets at least one block (progress); later ones may get none.

``policy="prefill-first"`` is the vLLM/Orca baseline Sarathi-Serve compares against: whole prompts
run as soon as they arrive and decodes wait for them.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from csps.config import SchedulerConfig, check_token_budget
from csps.core import kv_placement as kp
from csps.core.kv_cache import KVCacheManager
from csps.core.request import Request, Status

Prefills = tuple[tuple[int, int, int], ...]  # (new tokens, cached tokens, sp degree)
Decodes = tuple[tuple[int, int], ...]  # (context length with the new token, sp degree)
# predicted seconds of a step made of these prefill chunks and decodes (csps.perf.step_timer.StepTimer)
StepTimeFn = Callable[[Prefills, Decodes], float]


@dataclass(frozen=True)
class ScheduledChunk:
    req_id: str
    start: int  # tokens of the request computed before this step
    num_tokens: int  # tokens computed in this step
    is_decode: bool
    samples: bool  # the chunk reaches the last known token and the request wants one more: the model samples it
    ranks: tuple[int, ...] = (0,)  # SP ranks computing this chunk
    sp: bool = False  # sequence-parallel request (KV spread over all SP ranks)


@dataclass
class SchedulerOutput:
    step_id: int
    chunks: list[ScheduledChunk] = field(default_factory=list)  # decodes first
    preempted: list[str] = field(default_factory=list)
    tokens_per_rank: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def num_decode_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks if c.is_decode)

    @property
    def num_prefill_tokens(self) -> int:
        return self.num_tokens - self.num_decode_tokens

    @property
    def empty(self) -> bool:
        return not self.chunks

    def items(self, num_ranks: int) -> tuple[Prefills, Decodes]:
        """The step as the cost model sees it: prefill chunks and decodes with their SP degree."""
        prefills, decodes = [], []
        for c in self.chunks:
            degree = num_ranks if c.sp else 1
            if c.is_decode:
                decodes.append((c.start + 1, degree))
            else:
                prefills.append((c.num_tokens, c.start, degree))
        return tuple(prefills), tuple(decodes)


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, kvs: list[KVCacheManager] | KVCacheManager,
                 sp_threshold_tokens: int | None = None, step_timer: StepTimeFn | None = None) -> None:
        """``step_timer``: enables adaptive chunking (with ``cfg.adaptive_chunking``)."""
        self.cfg = cfg
        self.kvs = [kvs] if isinstance(kvs, KVCacheManager) else list(kvs)
        self.kv = self.kvs[0]
        self.num_ranks = len(self.kvs)
        self.sp_threshold = sp_threshold_tokens
        self.block_size = self.kv.block_size
        check_token_budget(cfg.token_budget, self.block_size)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.step_id = 0
        self.watermark_blocks = max(1, self.kv.pool.num_blocks // 100)
        self.step_timer = step_timer if cfg.adaptive_chunking else None
        self._prefills: list[tuple[int, int, int]] = []  # this step's items so far, for the timer
        self._decodes: list[tuple[int, int]] = []
        self._budget_s: float | None = None  # this step's time budget (None: token budget only)

    # -- placement -------------------------------------------------------------------------
    def is_sp(self, req: Request) -> bool:
        return req.sp_degree > 1

    def ranks_of(self, req: Request) -> range | tuple[int, ...]:
        return range(self.num_ranks) if self.is_sp(req) else (req.owner_rank,)

    def local_count(self, req: Request, rank: int, upto: int) -> int:
        """Tokens of positions < upto that ``rank`` holds for ``req``."""
        if self.is_sp(req):
            return kp.count_before(upto, rank, self.num_ranks, self.block_size)
        return upto if rank == req.owner_rank else 0

    def shares(self, req: Request, start: int, end: int) -> list[int]:
        if self.is_sp(req):
            return kp.shares(start, end, self.num_ranks, self.block_size)
        out = [0] * self.num_ranks
        out[req.owner_rank] = end - start
        return out

    def decode_rank(self, req: Request) -> int:
        """The rank computing (and holding the KV of) the request's next token."""
        if self.is_sp(req):
            return kp.rank_of(req.num_computed_tokens, self.num_ranks, self.block_size)
        return req.owner_rank

    def block_tokens(self, req: Request, rank: int) -> Callable[[int], list[int]]:
        """Tokens of the request's i-th block on ``rank`` (computed lazily: prompts can be huge)."""
        bs = self.block_size
        if not self.is_sp(req):
            return lambda i: req.token_ids(i * bs, (i + 1) * bs)
        p = self.num_ranks
        return lambda i: [req.token_at(kp.local_to_pos(j, rank, p, bs)) for j in range(i * bs, (i + 1) * bs)]

    def placement_key(self, req: Request, rank: int) -> bytes:
        return kp.placement_key(rank, self.num_ranks) if self.is_sp(req) else b""

    def _place(self, req: Request) -> None:
        """Decide SP vs single rank once, on first admission."""
        if self.num_ranks == 1 or req.sp_degree > 1:
            return
        need = min(req.num_prompt_tokens + req.params.max_tokens, self.cfg.max_model_len)
        too_big = -(-need // self.block_size) > self.kv.pool.num_blocks - 1
        if (self.sp_threshold is not None and req.num_prompt_tokens > self.sp_threshold) or too_big:
            req.sp_degree = self.num_ranks

    # -- queue management ------------------------------------------------------------------
    def add(self, req: Request) -> None:
        self.requests[req.req_id] = req
        self.waiting.append(req)

    def finish(self, req_id: str, status: Status) -> Request | None:
        """Remove a request (finished or aborted) and free its blocks on every rank at once."""
        req = self.requests.pop(req_id, None)
        if req is None:
            return None
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        req.status = status
        for kv in self.kvs:
            kv.free(req_id)
        return req

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # -- helpers ---------------------------------------------------------------------------
    def _chunk_size(self, req: Request, start: int, remaining: int, budgets: list[int]) -> int:
        """Largest chunk (all of ``remaining``, else a block multiple) whose shares fit the token
        budgets and whose step fits the time budget."""
        return self._time_limit(req, start, self._token_limit(req, start, remaining, budgets))

    def _token_limit(self, req: Request, start: int, remaining: int, budgets: list[int]) -> int:
        bs = self.block_size
        if not self.is_sp(req):
            b = budgets[req.owner_rank]
            return remaining if remaining <= b else b - b % bs
        if all(s <= b for s, b in zip(self.shares(req, start, start + remaining), budgets)):
            return remaining
        n = min(remaining, self.num_ranks * min(budgets))
        n -= n % bs
        while n > 0 and any(s > b for s, b in zip(self.shares(req, start, start + n), budgets)):
            n -= bs
        return n

    def _time_limit(self, req: Request, start: int, n: int) -> int:
        """The largest of n, or a whole number of blocks below it, whose step the timer predicts within
        this step's time budget (binary search); at least one block for a step's first prefill."""
        if self._budget_s is None or n <= 0:
            return n
        degree = self.num_ranks if self.is_sp(req) else 1
        prefills, decodes = tuple(self._prefills), tuple(self._decodes)

        def fits(m: int) -> bool:
            return self.step_timer(prefills + ((m, start, degree),), decodes) <= self._budget_s

        if fits(n):
            return n
        bs = self.block_size
        lo = 0 if self._prefills else 1  # in blocks; the first prefill of a step always progresses
        hi = (n - 1) // bs
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fits(mid * bs):
                lo = mid
            else:
                hi = mid - 1
        return min(n, lo * bs)

    def _start_time_budget(self, budgets: list[int]) -> None:
        """After the decodes are in: this step's time budget for its prefill chunks (only a step with
        decodes has one: with nobody waiting for a token, a long prompt takes whole chunks). The auto
        budget prices the step a fresh prompt could make now: these decodes plus the whole blocks of token
        budget they leave on the fullest rank."""
        if self.step_timer is None or not self._decodes:
            self._budget_s = None
        elif self.cfg.step_time_budget_ms is not None:
            self._budget_s = self.cfg.step_time_budget_ms / 1e3
        else:
            fresh = max(self.block_size, min(budgets) - min(budgets) % self.block_size)
            self._budget_s = self.step_timer(((fresh, 0, 1),), tuple(self._decodes))

    def _preempt(self, victim: Request, out: SchedulerOutput) -> None:
        self.running.remove(victim)
        for kv in self.kvs:
            kv.free(victim.req_id)
        victim.num_computed_tokens = 0
        victim.num_preemptions += 1
        victim.status = Status.WAITING
        self.waiting.appendleft(victim)
        out.preempted.append(victim.req_id)

    def _allocate_or_preempt(self, req: Request, upto: int, scheduled: set[str],
                             out: SchedulerOutput) -> bool:
        """Grow ``req``'s tables to ``upto`` tokens, preempting unscheduled requests from the tail."""
        while True:
            lacking = [r for r in self.ranks_of(req)
                       if not self.kvs[r].can_allocate(req.req_id, self.local_count(req, r, upto))]
            if not lacking:
                for r in self.ranks_of(req):
                    ok = self.kvs[r].allocate_slots(req.req_id, self.local_count(req, r, upto))
                    assert ok
                return True
            victims = [x for x in self.running if x.req_id not in scheduled
                       and any(x.req_id in self.kvs[r].tables for r in lacking)]
            if not victims:
                return False
            victim = victims[-1]
            self._preempt(victim, out)
            if victim is req:
                return False

    def _emit(self, out: SchedulerOutput, req: Request, n: int, scheduled: set[str],
              budgets: list[int], ranks: tuple[int, ...]) -> None:
        start = req.num_computed_tokens
        out.chunks.append(ScheduledChunk(
            req_id=req.req_id, start=start, num_tokens=n, is_decode=req.is_decode,
            samples=start + n == req.num_tokens and req.wants_token, ranks=ranks, sp=self.is_sp(req)))
        scheduled.add(req.req_id)
        degree = self.num_ranks if self.is_sp(req) else 1
        if req.is_decode:
            self._decodes.append((start + 1, degree))
        else:
            self._prefills.append((n, start, degree))
        for r, s in enumerate(self.shares(req, start, start + n)):
            budgets[r] -= s
            out.tokens_per_rank[r] += s

    # -- the packer ------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        self.step_id += 1
        out = SchedulerOutput(step_id=self.step_id, tokens_per_rank=[0] * self.num_ranks)
        self._prefills, self._decodes, self._budget_s = [], [], None
        if self.cfg.policy == "prefill-first":
            self._schedule_prefill_first(out)
        else:
            self._schedule_stall_free(out)
        out.chunks.sort(key=lambda c: not c.is_decode)  # decodes first in the plan
        return out

    def _schedule_decodes(self, out: SchedulerOutput, budgets: list[int], scheduled: set[str]) -> None:
        for req in list(self.running):
            if req.status is not Status.RUNNING or not req.is_decode:  # (preempted meanwhile)
                continue
            r = self.decode_rank(req)
            if budgets[r] <= 0:
                continue
            if self._allocate_or_preempt(req, req.num_computed_tokens + 1, scheduled, out):
                self._emit(out, req, 1, scheduled, budgets, (r,))

    def _schedule_stall_free(self, out: SchedulerOutput) -> None:
        budgets = [self.cfg.token_budget] * self.num_ranks
        scheduled: set[str] = set()
        self._schedule_decodes(out, budgets, scheduled)  # 1. every running decode
        self._start_time_budget(budgets)
        for req in list(self.running):  # 2. the next chunk of partly prefilled prompts
            if req.status is not Status.RUNNING or req.req_id in scheduled or req.is_decode:
                continue
            n = self._chunk_size(req, req.num_computed_tokens, req.num_missing_tokens, budgets)
            if n > 0 and self._allocate_or_preempt(req, req.num_computed_tokens + n, scheduled, out):
                self._emit(out, req, n, scheduled, budgets, tuple(self.ranks_of(req)))
        if not out.preempted:  # 3. new requests (none after a preemption: memory is tight)
            self._admit(out, budgets, scheduled, whole_prompts=False)

    def _schedule_prefill_first(self, out: SchedulerOutput) -> None:
        """Baseline: whole prompts alone as soon as they arrive; decodes only in steps without one."""
        scheduled: set[str] = set()
        budgets = [max(self.cfg.token_budget, self.cfg.max_model_len)] * self.num_ranks
        for req in list(self.running):  # prompts being recomputed after a preemption
            if req.status is Status.RUNNING and not req.is_decode:
                if self._allocate_or_preempt(req, req.num_tokens, scheduled, out):
                    self._emit(out, req, req.num_missing_tokens, scheduled, budgets, tuple(self.ranks_of(req)))
        if not out.preempted:
            self._admit(out, budgets, scheduled, whole_prompts=True)
        if not out.chunks:
            self._schedule_decodes(out, [self.cfg.token_budget] * self.num_ranks, scheduled)

    def _prefix_hits(self, req: Request) -> tuple[dict[int, list[int]], int]:
        """Cached blocks to adopt per rank and the number of prompt tokens they cover."""
        bs, limit = self.block_size, req.num_tokens - 1  # at least one token must be computed
        if not self.is_sp(req):
            found = {r: self.kvs[r].find_cached_prefix(self.block_tokens(req, r), limit // bs)
                     for r in range(self.num_ranks)}
            # the longest cached prefix wins, then the emptiest pool
            r = max(found, key=lambda r: (len(found[r]), self.kvs[r].pool.num_free, -r))
            req.owner_rank = r
            return {r: found[r]}, len(found[r]) * bs
        p, stripe = self.num_ranks, 2 * self.num_ranks * bs
        per_rank = {r: self.kvs[r].find_cached_prefix(
            self.block_tokens(req, r), kp.count_before(limit, r, p, bs) // bs, self.placement_key(req, r))
            for r in range(p)}
        # the hit must cover whole stripes so every rank's share ends on a block boundary
        num_hit = min(min(len(h) for h in per_rank.values()) * bs * p, limit)
        num_hit -= num_hit % stripe
        return {r: h[: num_hit // p // bs] for r, h in per_rank.items()}, num_hit

    def _admit(self, out: SchedulerOutput, budgets: list[int], scheduled: set[str], whole_prompts: bool) -> None:
        while self.waiting and len(self.running) < self.cfg.max_num_seqs and max(budgets) > 0:
            req = self.waiting[0]
            self._place(req)
            if not self.is_sp(req):  # choose the owner among ranks with budget left
                hits, num_hit = self._prefix_hits(req)
                if budgets[req.owner_rank] <= 0:
                    req.owner_rank = max((r for r in range(self.num_ranks) if budgets[r] > 0),
                                         key=lambda r: (self.kvs[r].pool.num_free, -r))
                    hits, num_hit = {req.owner_rank: []}, 0
            else:
                hits, num_hit = self._prefix_hits(req)
            remaining = req.num_tokens - num_hit
            n = remaining if whole_prompts else self._chunk_size(req, num_hit, remaining, budgets)
            if n == 0 or (whole_prompts and out.chunks and
                          any(s > b for s, b in zip(self.shares(req, num_hit, num_hit + n), budgets))):
                break
            fits = True
            for r in self.ranks_of(req):
                kv, adopt = self.kvs[r], hits.get(r, [])
                need = -(-self.local_count(req, r, num_hit + n) // self.block_size) - len(adopt)
                free = kv.pool.num_free - sum(1 for b in adopt if kv.pool.ref_counts[b] == 0)
                fits &= need + self.watermark_blocks <= free
            if not fits:
                break
            self.waiting.popleft()
            for r in self.ranks_of(req):
                self.kvs[r].adopt_prefix(req.req_id, hits.get(r, []))
                ok = self.kvs[r].allocate_slots(req.req_id, self.local_count(req, r, num_hit + n))
                assert ok, "allocation checked above"
            if req.num_preemptions == 0:
                self.kvs[req.owner_rank if not self.is_sp(req) else 0].record_lookup(req.num_tokens, num_hit)
                req.num_cached_tokens = num_hit
            req.num_computed_tokens = num_hit
            req.status = Status.RUNNING
            self.running.append(req)
            self._emit(out, req, n, scheduled, budgets, tuple(self.ranks_of(req)))

    # -- after the model ran ---------------------------------------------------------------
    def complete_step(self, out: SchedulerOutput) -> None:
        """Advance computed tokens and publish newly full blocks to each rank's prefix cache."""
        for c in out.chunks:
            req = self.requests.get(c.req_id)
            if req is None or req.status is not Status.RUNNING:
                continue
            req.num_computed_tokens = c.start + c.num_tokens
            for r in self.ranks_of(req):
                self.kvs[r].cache_full_blocks(req.req_id, self.block_tokens(req, r),
                                              self.local_count(req, r, req.num_computed_tokens),
                                              self.placement_key(req, r))

    # -- introspection ---------------------------------------------------------------------
    @property
    def prefix_cache_hit_rate(self) -> float:
        lookups = sum(kv.num_lookup_tokens for kv in self.kvs)
        return sum(kv.num_hit_tokens for kv in self.kvs) / lookups if lookups else 0.0
