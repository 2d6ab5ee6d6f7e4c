"""Attention for one rank's share of a step that contains sequence-parallel requests.

Per layer, on every SP rank, in plan order (every rank issues the same collectives):
  1. single-rank sequences: the local paged attention (``LocalAttention``);
  2. all sequence-parallel decodes together: pass-Q — each query goes to the ranks holding its
     sequence's KV, which return partial ``(out, lse)`` to be merged at the computing rank; the
     traffic per token does not depend on the context length;
  3. each sequence-parallel prefill chunk: pass-KV (ring attention: KV blocks rotate, overlapped
     with attention on the block in hand), pass-Q (the chunk's queries visit the cached KV), or
     Ulysses (all-to-all over heads for the chunk's own tokens, pass-Q for the cached part) —
     as chosen per chunk by rank 0 (``SPSeqWork.exchange``).
A rank's KV for an SP request sits at the positions ``kv_placement`` assigns it, in position
order, so every rank can compute every other rank's key positions from the plan: positions never
travel, only K/V (pass-KV) or Q and partial outputs (pass-Q).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

from csps.core.plan import SeqWork, SPSeqWork, ranges_to_list
from csps.engine.block_tables import RankBlockTables
from csps.engine.paged_attention import KVCacheTensors, LocalAttention, slots_for
from csps.kernels import attention, merge_attn
from csps.kernels.decode import HeadGroups, paged_decode
from csps.kernels.paged import gather_kv, write_kv
from csps.parallel.comm import Comm
from csps.parallel.pass_q import pass_q_attention
from csps.parallel.ring_attention import ring_attention


def local_positions(num: int, layout: tuple[int, int, int]) -> torch.Tensor:
    """Positions of a rank's first ``num`` KV tokens under zigzag placement (vectorised
    ``kv_placement.local_to_pos``)."""
    sp, rank, g = layout
    i = torch.arange(num, dtype=torch.int64)
    stripe, within = i // (2 * g), i % (2 * g)
    piece = torch.where(within < g, rank, 2 * sp - 1 - rank)
    return stripe * 2 * sp * g + piece * g + within % g


class _SPSeq:
    """Per-step facts about one SP sequence, seen from this rank (every rank's share is derived from
    the chunk's positions: nothing about other ranks travels in the plan). What grows with the context
    (key positions, the block-id tensor) is built only if a path reads it: a decode without a window
    needs neither."""

    def __init__(self, s: SPSeqWork, me: int, sp: int, granule: int, tables: RankBlockTables, row: int) -> None:
        self.work = s
        self.mine: SeqWork = s.mine
        self.rows = slice(row, row + self.mine.num_tokens)
        self.tables = tables
        self.block_table = tables[s.req_id]
        self.shares = s.shares(sp, granule)
        self.layout = (sp, granule)
        self.q_pos = [torch.tensor(ranges_to_list(w.pos), dtype=torch.int64) for w in self.shares]
        self.num_q = [w.num_tokens for w in self.shares]
        self.any_cached = any(w.num_kv_before for w in self.shares)
        self.is_decode = s.is_decode

    @functools.cached_property
    def block_ids(self) -> torch.Tensor:
        return self.tables.block_ids(self.work.req_id, len(self.block_table))

    @functools.cached_property
    def k_pos(self) -> list[torch.Tensor]:
        """Positions of every rank's KV of the sequence after this step."""
        sp, g = self.layout
        return [local_positions(w.num_kv, (sp, r, g)) for r, w in enumerate(self.shares)]

    @functools.cached_property
    def cached_k_pos(self) -> list[torch.Tensor]:
        """Positions of every rank's KV of the sequence before this step."""
        sp, g = self.layout
        return [local_positions(w.num_kv_before, (sp, r, g)) for r, w in enumerate(self.shares)]


class SPAttention:
    def __init__(self, local: list[SeqWork], sp_seqs: list[SPSeqWork], tables: RankBlockTables,
                 cache: KVCacheTensors, sp_comm: Comm, scale: float, heads: HeadGroups,
                 sliding_window: int | None = None) -> None:
        self.local = LocalAttention(local, tables, cache, scale, heads, sliding_window)
        self.cache, self.comm, self.scale, self.window = cache, sp_comm, scale, sliding_window
        self.tables, self.heads = tables, heads
        self.kv_head_map = None if heads.grouped else heads.kv_of_q  # on the cache's device
        row = self.local.num_rows
        self.seqs: list[_SPSeq] = []
        slots = [self.local.slots]
        for s in sp_seqs:
            seq = _SPSeq(s, sp_comm.rank, sp_comm.size, cache.block_size, tables, row)
            self.seqs.append(seq)
            row += seq.mine.num_tokens
            slots.append(torch.tensor(slots_for(seq.mine, seq.block_table, cache.block_size),
                                      dtype=torch.int64).to(cache.device))
        self.slots = torch.cat(slots)
        self.decodes = [s for s in self.seqs if s.is_decode]
        self.prefills = [s for s in self.seqs if not s.is_decode]

    def _attn_fn(self) -> Callable:
        if self.kv_head_map is None:
            return attention
        idx = self.kv_head_map

        def fn(q, k, v, q_pos, k_pos, scale=None, sliding_window=None):
            return attention(q, k.index_select(1, idx), v.index_select(1, idx), q_pos, k_pos, scale, sliding_window)

        return fn

    def _local_kv(self, layer: int, s: _SPSeq, num: int) -> tuple[torch.Tensor, torch.Tensor]:
        # this rank's first ``num`` KV tokens of the sequence: [num, Hkv_l, D]
        return gather_kv(self.cache.k[layer], self.cache.v[layer], s.block_ids, num)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q: [T, Hq_l, D], k/v: [T, Hkv_l, D] -> out [T, Hq_l, D]
        if self.slots.numel():
            write_kv(self.cache.k[layer], self.cache.v[layer], k, v, self.slots)
        out = torch.empty_like(q)
        self.local.compute(layer, q, k, v, out)
        attn_fn = self._attn_fn()
        if self.decodes:
            self._decodes(layer, q, out, attn_fn)
        for s in self.prefills:
            out[s.rows] = self._prefill(layer, s, q, k, v, attn_fn)
        return out

    def _decodes(self, layer: int, q: torch.Tensor, out: torch.Tensor, attn_fn: Callable) -> None:
        """All SP decodes in one pass-Q exchange; queries ordered by computing rank, then plan order."""
        me, size = self.comm.rank, self.comm.size
        order = [s for r in range(size) for s in self.decodes if s.num_q[r]]
        num_q = [sum(s.num_q[r] for s in self.decodes) for r in range(size)]
        mine = [s for s in self.decodes if s.num_q[me]]
        q_mine = torch.cat([q[s.rows] for s in mine]) if mine else q[:0]
        q_pos_mine = torch.cat([s.q_pos[me] for s in mine]) if mine else torch.zeros(0, dtype=torch.int64)
        if self.window is None:
            # every query sees all of this rank's KV of its sequence: one paged decode call over it, in place
            dev = self.cache.device
            rows = self.tables.rows([s.work.req_id for s in order]).to(dev)
            lens = [s.mine.num_kv for s in order]
            lens_t = torch.tensor(lens, dtype=torch.int64).to(dev)

            def local_attn(q_all: torch.Tensor, q_pos_all: torch.Tensor):
                return paged_decode(q_all, self.cache.k[layer], self.cache.v[layer], self.tables.tensor, rows, lens_t,
                                    max(lens, default=0), self.heads, self.scale)
        else:  # a window is a rule on positions, which a rank's zigzag share does not keep consecutive
            def local_attn(q_all: torch.Tensor, q_pos_all: torch.Tensor):
                outs, lses = [], []
                for i, s in enumerate(order):
                    kk, vv = self._local_kv(layer, s, s.mine.num_kv)
                    o, l = attn_fn(q_all[i : i + 1], kk, vv, q_pos_all[i : i + 1], s.k_pos[me], scale=self.scale,
                                   sliding_window=self.window)
                    outs.append(o)
                    lses.append(l)
                if not outs:
                    return q_all.new_zeros(q_all.shape), torch.full(q_all.shape[:2], float("-inf"))
                return torch.cat(outs), torch.cat(lses)

        q_pos_all = [torch.cat([s.q_pos[r] for s in self.decodes if s.num_q[r]] or
                               [torch.zeros(0, dtype=torch.int64)]) for r in range(size)]
        o, _ = pass_q_attention(q_mine, q_pos_mine, self.comm, local_attn, num_q, q_pos_per_rank=q_pos_all)
        row = 0
        for s in mine:
            out[s.rows] = o[row : row + 1]
            row += 1

    def _prefill(self, layer: int, s: _SPSeq, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 attn_fn: Callable) -> torch.Tensor:
        me, w = self.comm.rank, s.mine
        qs, qp = q[s.rows], s.q_pos[me]
        exchange = s.work.exchange
        if exchange == "pass_kv":
            if w.num_kv_before == 0:
                kk, vv = k[s.rows], v[s.rows]
            else:
                kk, vv = self._local_kv(layer, s, w.num_kv)
            o, _ = ring_attention(qs, qp, kk, vv, s.k_pos, self.comm, attn_fn, self.scale, self.window)
            return o
        if exchange == "pass_q":
            kk, vv = self._local_kv(layer, s, w.num_kv)
            return self._pass_q(qs, qp, s, kk, vv, s.k_pos[me], attn_fn)[0]
        # ulysses: the chunk's own tokens by all-to-all over heads, the cached part by pass-Q
        from csps.parallel.ulysses import ulysses_attention

        kn, vn = k[s.rows], v[s.rows]
        if self.kv_head_map is not None:  # uneven TP head groups: give every query head its KV head
            kn, vn = kn.index_select(1, self.kv_head_map), vn.index_select(1, self.kv_head_map)
        o_new, l_new = ulysses_attention(qs, kn, vn, s.q_pos, self.comm, self.scale, self.window)
        if not s.any_cached:
            return o_new
        kk, vv = self._local_kv(layer, s, w.num_kv_before)
        o_old, l_old = self._pass_q(qs, qp, s, kk, vv, s.cached_k_pos[me], attn_fn)
        return merge_attn(o_new, l_new, o_old, l_old)[0]

    def _pass_q(self, qs, qp, s: _SPSeq, kk, vv, k_pos, attn_fn):
        def local_attn(q_all, q_pos_all):
            return attn_fn(q_all, kk, vv, q_pos_all, k_pos, scale=self.scale, sliding_window=self.window)

        return pass_q_attention(qs, qp, self.comm, local_attn, s.num_q, q_pos_per_rank=s.q_pos)
