"""Attention over the paged KV cache for one step's packed batch on one rank.

Built once per step from the rank's ``SeqWork`` list and their block tables, then called by every layer as
``attn(layer, q, k, v) -> out``: it writes the new K/V into the cache (slot mapping), runs the
batched fp32 decode attention for one-token sequences (long contexts in long runs of blocks read
the cache in place instead, a fused call per run) and the chunked-prefill attention (chunk on top
of cached KV) for the others. Every call returns only ``out``; ``partial`` exposes
``(out, lse)`` for the sequence-parallel wrappers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from csps.core.plan import SeqWork, ranges_to_list
from csps.kernels import attention, decode_attention, decode_attention_one, merge_many
from csps.kernels.paged import gather_kv, gather_kv_padded, write_kv


class KVCacheTensors:
    """One rank's KV cache: per layer k/v [num_blocks, block_size, Hkv_local, D] (zero-filled)."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype) -> None:
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype) for _ in range(num_layers)]
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.bytes = 2 * num_layers * num_blocks * block_size * num_kv_heads * head_dim * self.k[0].element_size()


def slots_for(seq: SeqWork, block_ids: list[int], block_size: int) -> list[int]:
    """Cache slots of the sequence's new tokens (they follow its cached ones)."""
    return [block_ids[i // block_size] * block_size + i % block_size for i in range(seq.num_kv_before, seq.num_kv)]


def block_runs(block_ids: list[int]) -> list[tuple[int, int]]:
    """(first block, count) of each run of consecutive block ids, in order."""
    runs: list[tuple[int, int]] = []
    for b in block_ids:
        if runs and runs[-1][0] + runs[-1][1] == b:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((b, 1))
    return runs


# A decode reads the cache in place, one fused call per run of consecutive blocks, when it is the
# step's only decode and its blocks are one run, or when its context is long and its runs hold at
# least IN_PLACE_MIN_RUN_TOKENS on average (prefill allocates a chunk's blocks together): copying
# its KV into the padded batch would cost more than the calls (benchmarks/cpu_kernels.py decode_long).
IN_PLACE_MIN_TOKENS = 1024
IN_PLACE_MIN_RUN_TOKENS = 256


def can_read_in_place(cache: "KVCacheTensors") -> bool:
    """Fused per-run decode calls want a CPU fp32 cache (see decode_attention_one)."""
    return bool(cache.k) and cache.k[0].dtype == torch.float32 and cache.k[0].device.type == "cpu"


def in_place_runs(block_ids: list[int], num_kv: int, block_size: int, alone: bool = False,
                  sliding_window: int | None = None) -> list[tuple[int, int]] | None:
    """The runs of blocks holding a decode's ``num_kv`` tokens, if reading them in place pays.

    ``alone``: the step's only decode. ``sliding_window``: only one run then (the fused call keeps
    the last ``sliding_window`` keys of what it is given).
    """
    runs = block_runs(block_ids[: -(-num_kv // block_size)])
    if len(runs) > 1 and sliding_window is not None:
        return None
    if (alone and len(runs) == 1) or (num_kv >= IN_PLACE_MIN_TOKENS and num_kv >= IN_PLACE_MIN_RUN_TOKENS * len(runs)):
        return runs
    return None


def run_views(cache: "KVCacheTensors", layer: int, runs: list[tuple[int, int]], num_kv: int):
    """(first token index, k, v) per run of blocks, views of the cache: k/v [run_tokens, Hkv, D]."""
    out, start = [], 0
    for b0, n in runs:
        kc, vc = (c[layer][b0 : b0 + n].flatten(0, 1)[: num_kv - start] for c in (cache.k, cache.v))
        out.append((start, kc, vc))
        start += kc.shape[0]
    return out


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
    def __init__(self, seqs: list[SeqWork], tables: list[list[int]], cache: KVCacheTensors, scale: float,
                 sliding_window: int | None = None, kv_head_map: list[int] | None = None) -> None:
        """``tables[i]``: the block table of ``seqs[i]`` on this rank (after this step's allocations)."""
        self.cache = cache
        self.scale = scale
        self.window = sliding_window
        # kv_head_map: for TP ranks whose query heads map unevenly onto local KV heads
        self.kv_head_map = torch.tensor(kv_head_map) if kv_head_map is not None else None
        bs = cache.block_size
        slots: list[int] = []
        decode_rows, decode_tables, lens = [], [], []
        self.prefills: list[_Prefill] = []
        # decodes read in place: (row, runs of blocks, num_kv); CPU fp32 only (see decode_attention_one;
        # CUDA has flash-attn's paged decode)
        self.decodes_in_place: list[tuple[int, list[tuple[int, int]], int]] = []
        in_place_ok = can_read_in_place(cache)
        alone = sum(1 for s in seqs if s.is_decode) == 1
        row = 0
        for s, block_ids in zip(seqs, tables):
            slots.extend(slots_for(s, block_ids, bs))
            n = s.num_tokens
            if s.is_decode:
                runs = in_place_runs(block_ids, s.num_kv, bs, alone, sliding_window) if in_place_ok else None
                if runs is not None:
                    self.decodes_in_place.append((row, runs, s.num_kv))
                else:
                    decode_rows.append(row)
                    decode_tables.append(block_ids[: -(-s.num_kv // bs)])
                    lens.append(s.num_kv)
            else:
                q_pos = torch.tensor(ranges_to_list(s.pos), dtype=torch.int64)
                runs = block_runs(block_ids[: -(-s.num_kv // bs)])
                self.prefills.append(_Prefill(
                    rows=slice(row, row + n), block_ids=torch.tensor(block_ids, dtype=torch.int64),
                    num_kv=s.num_kv, q_pos=q_pos, k_pos=torch.arange(s.num_kv), fresh=s.num_kv_before == 0,
                    span=runs[0] if len(runs) == 1 else None))
            row += n
        self.num_rows = row
        self.slots = torch.tensor(slots, dtype=torch.int64)
        self.decode_rows = torch.tensor(decode_rows, dtype=torch.int64)
        self.decode_lens = torch.tensor(lens, dtype=torch.int64)
        width = max((len(t) for t in decode_tables), default=0)
        self.decode_tables = torch.tensor([t + [0] * (width - len(t)) for t in decode_tables], dtype=torch.int64)

    def _expand(self, k: torch.Tensor) -> torch.Tensor:
        # k: [..., Hkv_l, D] -> [..., Hq_l, D] when local query heads do not group evenly
        return k if self.kv_head_map is None else k.index_select(-2, self.kv_head_map)

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
        if self.decode_rows.numel():
            if q.is_cuda and self.kv_head_map is None:  # flash-attn paged decode, imported lazily
                from csps.kernels.cuda_attention import flash_decode_paged

                o, _ = flash_decode_paged(q[self.decode_rows], self.cache.k[layer], self.cache.v[layer],
                                          self.decode_tables, self.decode_lens, self.scale, self.window)
            else:
                kc, vc = gather_kv_padded(self.cache.k[layer], self.cache.v[layer], self.decode_tables)
                o, _ = decode_attention(q[self.decode_rows], self._expand(kc), self._expand(vc),
                                        self.decode_lens, self.scale, self.window)
            out[self.decode_rows] = o
        for row, runs, num_kv in self.decodes_in_place:
            out[row] = self._decode_in_place(layer, q[row], runs, num_kv)
        for p in self.prefills:
            kk, vv = self.prefill_kv(layer, p, k, v)
            o, _ = attention(q[p.rows], self._expand(kk), self._expand(vv), p.q_pos, p.k_pos,
                             self.scale, self.window)
            out[p.rows] = o

    def _decode_in_place(self, layer: int, q: torch.Tensor, runs: list[tuple[int, int]], num_kv: int) -> torch.Tensor:
        """One decode over its cached KV read in place: a fused call per run of blocks, merged by LSE."""
        # q: [Hq_l, D] -> out [Hq_l, D]
        outs, lses = [], []
        for _, kc, vc in run_views(self.cache, layer, runs, num_kv):
            o, lse = decode_attention_one(q, self._expand(kc), self._expand(vc), self.scale, self.window)
            outs.append(o[None])
            lses.append(lse[None])
        return merge_many(outs, lses)[0][0]
