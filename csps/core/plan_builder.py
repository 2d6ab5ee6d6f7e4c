"""Rank 0 turns a scheduler output into one step plan per SP rank (no torch).

It remembers how many of each request's blocks every rank has been told about, so a plan carries
only the blocks allocated since (a decode step: usually none, one when it crosses a block
boundary), and which requests' KV was freed since the last plan (finished, aborted, preempted), so
the ranks drop those tables. Work per step is O(batch): nothing here walks a whole block table.
"""

from __future__ import annotations

from typing import Callable

from csps.core import kv_placement as kp
from csps.core.kv_cache import KVCacheManager
from csps.core.plan import SeqWork, SPSeqWork, StepPlan
from csps.core.request import Request
from csps.core.scheduler import ScheduledChunk, SchedulerOutput

# (num new tokens, num cached tokens) -> "pass_kv" | "pass_q" | "ulysses"
ChooseExchange = Callable[[int, int], str]


class PlanBuilder:
    def __init__(self, kvs: list[KVCacheManager], block_size: int, choose_exchange: ChooseExchange | None) -> None:
        """``choose_exchange``: for sequence-parallel prefill chunks (None at SP 1, where there are none)."""
        self.kvs = kvs
        self.sp = len(kvs)
        self.block_size = block_size
        self.choose_exchange = choose_exchange
        self.blocks_sent: list[dict[str, int]] = [{} for _ in kvs]  # rank -> req_id -> blocks announced
        self.freed: list[str] = []

    def forget(self, req_id: str) -> None:
        """The request's KV was freed (finished, aborted, preempted): the ranks drop its tables."""
        known = False
        for sent in self.blocks_sent:
            known |= sent.pop(req_id, None) is not None
        if known:
            self.freed.append(req_id)

    def _new_blocks(self, rank: int, req_id: str) -> list[int]:
        table = self.kvs[rank].table(req_id)
        sent = self.blocks_sent[rank].get(req_id, 0)
        self.blocks_sent[rank][req_id] = len(table)
        return table[sent:]

    def build(self, out: SchedulerOutput, requests: dict[str, Request]) -> list[StepPlan]:
        """One plan per SP rank, in rank order. Local sequences keep the scheduler's chunk order."""
        for req_id in out.preempted:
            self.forget(req_id)
        freed, self.freed = self.freed, []
        plans = [StepPlan(step_id=out.step_id, free_req_ids=list(freed)) for _ in range(self.sp)]
        for c in out.chunks:
            req = requests[c.req_id]
            if c.sp:
                self._add_sp(plans, c, req)
            else:
                r = c.ranks[0]
                plans[r].seqs.append(SeqWork(
                    req_id=c.req_id, token_ids=req.token_ids(c.start, c.start + c.num_tokens),
                    pos=[(c.start, c.start + c.num_tokens)], new_block_ids=self._new_blocks(r, c.req_id),
                    num_kv_before=c.start, is_decode=c.is_decode, sample=c.samples))
        return plans

    def _add_sp(self, plans: list[StepPlan], c: ScheduledChunk, req: Request) -> None:
        p, bs = self.sp, self.block_size
        end = c.start + c.num_tokens
        ranges = kp.ranges_per_rank(c.start, end, p, bs)
        owner = kp.rank_of(end - 1, p, bs)
        exchange = "pass_q" if c.is_decode else self.choose_exchange(c.num_tokens, c.start)
        for r in range(p):
            toks = [t for a, b in ranges[r] for t in req.token_ids(a, b)]
            mine = SeqWork(req_id=c.req_id, token_ids=toks, pos=ranges[r], new_block_ids=self._new_blocks(r, c.req_id),
                           num_kv_before=kp.count_before(c.start, r, p, bs), is_decode=c.is_decode and bool(toks),
                           sample=c.samples and r == owner)
            plans[r].sp_seqs.append(SPSeqWork(req_id=c.req_id, start=c.start, end=end, mine=mine,
                                              exchange=exchange, is_decode=c.is_decode))


def sample_order(plans: list[StepPlan]) -> list[str]:
    """Request ids of the sampled rows in the order rank 0 gathers them: SP rank by SP rank, each
    rank's local sequences then its sequence-parallel ones."""
    order = []
    for plan in plans:
        order += [s.req_id for s in plan.seqs if s.sample]
        order += [s.req_id for s in plan.sp_seqs if s.mine.sample]
    return order
