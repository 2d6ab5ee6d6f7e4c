"""Attention over the paged KV cache for one step's packed batch on one rank.

Built once per step from the rank's ``SeqWork`` list and its block tables, then called by every layer as
``attn(layer, q, k, v) -> out``: it writes the new K/V into the cache (slot mapping), runs every
one-token sequence of the step in one paged decode call (``csps.kernels.decode``: blocks read in
place) and the chunked-prefill attention (a chunk on top of its cached KV) for the others.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from csps.core.plan import SeqWork, ranges_to_list
from csps.engine.block_tables import RankBlockTables
from csps.kernels import attention
from csps.kernels.decode import HeadGroups, paged_decode
from csps.kernels.paged import gather_kv, write_kv


class KVCacheTensors:
    """One rank's KV cache: per layer k/v [num_blocks, block_size, Hkv_local, D] (zero-filled)."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.device = torch.device(device)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.bytes = 2 * num_layers * num_blocks * block_size * num_kv_heads * head_dim * self.k[0].element_size()


def slots_for(seq: SeqWork, block_ids: list[int], block_size: int) -> list[int]:
    """Cache slots of the sequence's new tokens (they follow its cached ones)."""
    return [block_ids[i // block_size] * block_size + i % block_size for i in range(seq.num_kv_before, seq.num_kv)]


@dataclass
class _Prefill:
    rows: slice
    block_ids: torch.Tensor
    num_kv: int
    q_pos: torch.Tensor
    k_pos: torch.Tensor
    fresh: bool  # no cached KV before this step: attend to the new k/v directly
    span: tuple[int, int] | None  # consecutive blocks: read the cache in place


class LocalAttention:
    def __init__(self, seqs: list[SeqWork], tables: RankBlockTables, cache: KVCacheTensors, scale: float,
                 heads: HeadGroups, sliding_window: int | None = None) -> None:
        """``tables``: the rank's block tables (after this step's allocations); ``heads``: which local KV
        head each local query head reads."""
        self.cache = cache
        self.scale = scale
        self.window = sliding_window
        self.heads = heads
        self.tables = tables
        dev = cache.device  # positions stay on the CPU (they steer the kernels); indices go to the device
        bs = cache.block_size
        slots: list[int] = []
        decode_rows: list[int] = []
        decode_ids: list[str] = []
        lens: list[int] = []
        self.prefills: list[_Prefill] = []
        row = 0
        for s in seqs:
            block_ids = tables[s.req_id]
            slots.extend(slots_for(s, block_ids, bs))
            n = s.num_tokens
            if s.is_decode:
                decode_rows.append(row)
                decode_ids.append(s.req_id)
                lens.append(s.num_kv)
            else:
                q_pos = torch.tensor(ranges_to_list(s.pos), dtype=torch.int64)
                num_blocks = -(-s.num_kv // bs)
                self.prefills.append(_Prefill(
                    rows=slice(row, row + n), block_ids=tables.block_ids(s.req_id, num_blocks),
                    num_kv=s.num_kv, q_pos=q_pos, k_pos=torch.arange(s.num_kv), fresh=s.num_kv_before == 0,
                    span=tables.span(s.req_id, num_blocks)))
            row += n
        self.num_rows = row
        self.slots = torch.tensor(slots, dtype=torch.int64).to(dev)
        # decodes come first in a plan: their rows are then one slice of the batch
        contiguous = decode_rows == list(range(len(decode_rows)))
        self.decode_rows = (slice(0, len(decode_rows)) if contiguous
                            else torch.tensor(decode_rows, dtype=torch.int64).to(dev))
        self.num_decodes = len(decode_rows)
        self.decode_table_rows = tables.rows(decode_ids).to(dev)
        self.decode_lens = torch.tensor(lens, dtype=torch.int64).to(dev)
        self.max_decode_len = max(lens, default=0)

    def _expand(self, k: torch.Tensor) -> torch.Tensor:
        # k: [..., Hkv_l, D] -> [..., Hq_l, D] when local query heads do not group evenly
        return k if self.heads.grouped else k.index_select(-2, self.heads.kv_of_q)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.slots.numel():
            write_kv(self.cache.k[layer], self.cache.v[layer], k, v, self.slots)

    def prefill_kv(self, layer: int, p: _Prefill, k: torch.Tensor, v: torch.Tensor):
        """K/V of one prefill sequence on this rank: [num_kv, Hkv_l, D] each."""
        if p.fresh:
            return k[p.rows], v[p.rows]
        if p.span is not None:
            b0, n = p.span
            return tuple(c[layer][b0 : b0 + n].flatten(0, 1)[: p.num_kv] for c in (self.cache.k, self.cache.v))
        return gather_kv(self.cache.k[layer], self.cache.v[layer], p.block_ids, p.num_kv)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q: [T, Hq_l, D], k/v: [T, Hkv_l, D] -> out [T, Hq_l, D]
        self.write(layer, k, v)
        out = torch.empty_like(q)
        self.compute(layer, q, k, v, out)
        return out

    def compute(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor) -> None:
        """Attention for this context's rows (the first ``num_rows`` of q/k/v), into ``out``."""
        if self.num_decodes:
            o, _ = paged_decode(q[self.decode_rows], self.cache.k[layer], self.cache.v[layer], self.tables.tensor,
                                self.decode_table_rows, self.decode_lens, self.max_decode_len, self.heads,
                                self.scale, self.window)
            out[self.decode_rows] = o
        for p in self.prefills:
            kk, vv = self.prefill_kv(layer, p, k, v)
            o, _ = attention(q[p.rows], self._expand(kk), self._expand(vv), p.q_pos, p.k_pos,
                             self.scale, self.window)
            out[p.rows] = o
