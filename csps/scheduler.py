"""Sarathi-Serve's stall-free batching, as a pure-Python packer (no torch).

Each step, within a token budget:
  1. every running decode (one token each) — decodes are never paused for a prefill;
  2. the next chunk of each partly prefilled prompt;
  3. new requests (FCFS), while KV blocks are free and the budget is not spent.
Chunks are multiples of the block size except the one that ends a prompt. KV blocks are
allocated incrementally, per step. When the pool is full, the most recently admitted running
request is preempted (its blocks freed; it is recomputed later and produces the same tokens).

``policy="prefill-first"`` is the vLLM/Orca baseline that Sarathi-Serve compares against: whole
prompts run alone as soon as they arrive and decodes wait for them.

The output is plain data (``SchedulerOutput``); the engine turns it into a step plan per rank.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from csps.config import SchedulerConfig
from csps.kv_cache import KVCacheManager
from csps.request import Request, Status


@dataclass(frozen=True)
class ScheduledChunk:
    req_id: str
    start: int  # tokens of the request already computed before this step
    num_tokens: int  # tokens computed in this step
    is_decode: bool
    samples: bool  # the chunk reaches the last known token: the model samples the next one


@dataclass
class SchedulerOutput:
    step_id: int
    chunks: list[ScheduledChunk] = field(default_factory=list)  # decodes first
    preempted: list[str] = field(default_factory=list)

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


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, kv: KVCacheManager) -> None:
        self.cfg = cfg
        self.kv = kv
        self.block_size = kv.block_size
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.step_id = 0
        self.watermark_blocks = max(1, kv.pool.num_blocks // 100)

    # -- queue management ------------------------------------------------------------------
    def add(self, req: Request) -> None:
        self.requests[req.req_id] = req
        self.waiting.append(req)

    def finish(self, req_id: str, status: Status) -> Request | None:
        """Remove a request (finished or aborted) and free its blocks at once."""
        req = self.requests.pop(req_id, None)
        if req is None:
            return None
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        req.status = status
        self.kv.free(req_id)
        return req

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # -- the packer ------------------------------------------------------------------------
    def _chunk_size(self, remaining: int, budget: int) -> int:
        """Tokens to take from a prompt: all that is left if it fits, else a block multiple."""
        if remaining <= budget:
            return remaining
        return budget - budget % self.block_size

    def _preempt(self, victim: Request, out: SchedulerOutput) -> None:
        self.running.remove(victim)
        self.kv.free(victim.req_id)
        victim.num_computed_tokens = 0
        victim.num_preemptions += 1
        victim.status = Status.WAITING
        self.waiting.appendleft(victim)
        out.preempted.append(victim.req_id)

    def _allocate_or_preempt(self, req: Request, num_tokens: int, scheduled: set[str],
                             out: SchedulerOutput) -> bool:
        """Allocate blocks for ``req``, preempting not-yet-scheduled requests from the tail."""
        while not self.kv.allocate_slots(req.req_id, num_tokens):
            victims = [r for r in self.running if r.req_id not in scheduled]
            if not victims:
                return False
            victim = victims[-1]
            self._preempt(victim, out)
            if victim is req:
                return False
        return True

    def schedule(self) -> SchedulerOutput:
        self.step_id += 1
        out = SchedulerOutput(step_id=self.step_id)
        if self.cfg.policy == "prefill-first":
            self._schedule_prefill_first(out)
        else:
            self._schedule_stall_free(out)
        return out

    def _emit(self, out: SchedulerOutput, req: Request, n: int, scheduled: set[str]) -> None:
        start = req.num_computed_tokens
        out.chunks.append(ScheduledChunk(
            req_id=req.req_id, start=start, num_tokens=n, is_decode=req.is_decode,
            samples=start + n == req.num_tokens,
        ))
        scheduled.add(req.req_id)

    def _schedule_stall_free(self, out: SchedulerOutput) -> None:
        budget = self.cfg.token_budget
        scheduled: set[str] = set()
        # 1. every running decode
        for req in list(self.running):
            if budget == 0:
                break
            if req not in self.running or not req.is_decode:
                continue
            if self._allocate_or_preempt(req, req.num_computed_tokens + 1, scheduled, out):
                self._emit(out, req, 1, scheduled)
                budget -= 1
        # 2. the next chunk of partly prefilled prompts
        for req in list(self.running):
            if req not in self.running or req.req_id in scheduled or req.is_decode:
                continue
            n = self._chunk_size(req.num_missing_tokens, budget)
            if n == 0:
                break
            if self._allocate_or_preempt(req, req.num_computed_tokens + n, scheduled, out):
                self._emit(out, req, n, scheduled)
                budget -= n
        # 3. new requests, first come first served (none after a preemption: memory is tight)
        if not out.preempted:
            self._admit(out, budget, scheduled, whole_prompts=False)
        # decodes first in the plan
        out.chunks.sort(key=lambda c: not c.is_decode)

    def _admit(self, out: SchedulerOutput, budget: int, scheduled: set[str], whole_prompts: bool) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs:
            req = self.waiting[0]
            tokens = req.all_token_ids
            # prefix cache: at least one token must be computed to produce logits
            hit_blocks = self.kv.find_cached_prefix(tokens, req.num_tokens - 1)
            num_hit = len(hit_blocks) * self.block_size
            remaining = req.num_tokens - num_hit
            n = remaining if whole_prompts else self._chunk_size(remaining, budget)
            if n == 0 or (whole_prompts and n > budget and out.chunks):
                break
            need = -(-(num_hit + n) // self.block_size) - len(hit_blocks)
            free_after_hits = self.kv.pool.num_free - sum(
                1 for b in hit_blocks if self.kv.pool.ref_counts[b] == 0)
            if need + self.watermark_blocks > free_after_hits:
                break
            self.waiting.popleft()
            self.kv.adopt_prefix(req.req_id, hit_blocks)
            ok = self.kv.allocate_slots(req.req_id, num_hit + n)
            assert ok, "allocation checked above"
            if req.num_preemptions == 0:
                self.kv.record_lookup(req.num_tokens, num_hit)
                req.num_cached_tokens = num_hit
            req.num_computed_tokens = num_hit
            req.status = Status.RUNNING
            self.running.append(req)
            self._emit(out, req, n, scheduled)
            budget -= n
        return budget

    def _schedule_prefill_first(self, out: SchedulerOutput) -> None:
        """Baseline: admit whole prompts alone; decodes only in steps without a new prompt."""
        scheduled: set[str] = set()
        budget = max(self.cfg.token_budget, self.cfg.max_model_len)
        for req in list(self.running):  # prompts being recomputed after a preemption
            if req not in self.running or req.is_decode:
                continue
            if self._allocate_or_preempt(req, req.num_tokens, scheduled, out):
                self._emit(out, req, req.num_missing_tokens, scheduled)
        if not out.preempted:
            self._admit(out, budget - out.num_tokens, scheduled, whole_prompts=True)
        if out.chunks:
            return
        for req in list(self.running):
            if req in self.running and req.is_decode:
                if self._allocate_or_preempt(req, req.num_computed_tokens + 1, scheduled, out):
                    self._emit(out, req, 1, scheduled)

    # -- after the model ran ---------------------------------------------------------------
    def complete_step(self, out: SchedulerOutput) -> None:
        """Advance computed tokens and publish newly full blocks to the prefix cache."""
        for c in out.chunks:
            req = self.requests.get(c.req_id)
            if req is None or req.status is not Status.RUNNING:
                continue
            req.num_computed_tokens = c.start + c.num_tokens
            self.kv.cache_full_blocks(req.req_id, req.all_token_ids, req.num_computed_tokens)
