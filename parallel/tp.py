"""Tensor-parallel (Megatron) helpers: pure functions on weights plus one all-reduce.

Weights are [out_features, in_features] (torch Linear layout).
  * column-parallel linear (QKV, gate/up): each TP rank holds a block of output ROWS
    (``shard_rows``); no communication, the output stays sharded on its last dim.
  * row-parallel linear (o_proj, down): each TP rank holds a block of input COLUMNS
    (``shard_cols``) and the matching slice of x; the partial products are summed with one
    all-reduce (kind "tp_allreduce"), bias added once after it.
Splits are contiguous and as even as possible (sizes differ by at most 1).

Attention heads: the q heads are split evenly and contiguously over the TP ranks, and each rank
holds the kv heads its q heads use (GQA: q head h uses kv head h // (Hq // Hkv)). When
Hkv % tp == 0 that is an exact kv split with no replication; when kv heads are fewer than tp or
not divisible (e.g. 9 q / 3 kv heads on tp=2) a kv head is replicated on every rank whose q heads
use it. ``HeadShard.kv_index_per_q`` maps local q heads to local kv heads for the kernels; when
``uniform_gqa`` is False the caller expands k/v with it (``k[:, idx]``) before attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from csps.parallel.comm import Comm
from csps.parallel.sharding import contiguous_shards


def shard_rows(w: torch.Tensor, tp_rank: int, tp: int) -> torch.Tensor:
    """Rows (dim 0) of ``w`` held by ``tp_rank``: column-parallel weight or bias."""
    start, end = contiguous_shards(w.shape[0], tp)[tp_rank]
    return w[start:end]


def shard_cols(w: torch.Tensor, tp_rank: int, tp: int) -> torch.Tensor:
    """Columns (dim 1) of ``w`` held by ``tp_rank``: row-parallel weight."""
    start, end = contiguous_shards(w.shape[1], tp)[tp_rank]
    return w[:, start:end]


def column_parallel_linear(
    x: torch.Tensor, w_shard: torch.Tensor, bias_shard: torch.Tensor | None = None
) -> torch.Tensor:
    """x: [T, in] -> [T, out_shard]. No communication."""
    return torch.nn.functional.linear(x, w_shard, bias_shard)


def row_parallel_linear(
    x_shard: torch.Tensor, w_shard: torch.Tensor, comm: Comm, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x_shard: [T, in_shard], w_shard: [out, in_shard] -> [T, out], summed over the TP group."""
    y = torch.nn.functional.linear(x_shard, w_shard)
    comm.all_reduce(y, kind="tp_allreduce")
    return y if bias is None else y + bias


@dataclass(frozen=True)
class HeadShard:
    """The heads one TP rank holds: q heads [q_start, q_end), kv heads [kv_start, kv_end)."""

    q_start: int
    q_end: int
    kv_start: int
    kv_end: int
    group: int  # q heads per kv head in the full model (Hq // Hkv)

    @property
    def num_q_heads(self) -> int:
        return self.q_end - self.q_start

    @property
    def num_kv_heads(self) -> int:
        return self.kv_end - self.kv_start

    def kv_index_per_q(self) -> torch.Tensor:
        """LongTensor [num_q_heads]: the local kv head of each local q head."""
        q = torch.arange(self.q_start, self.q_end)
        return q // self.group - self.kv_start

    @property
    def uniform_gqa(self) -> bool:
        """True if local q head i uses local kv head i // (num_q_heads // num_kv_heads)."""
        nq, nkv = self.num_q_heads, self.num_kv_heads
        if nq == 0:
            return True
        if nq % nkv:
            return False
        return bool(torch.equal(self.kv_index_per_q(), torch.arange(nq) // (nq // nkv)))


def head_shards(num_q_heads: int, num_kv_heads: int, tp: int) -> list[HeadShard]:
    """The heads of every TP rank (see the module docstring)."""
    if num_q_heads % num_kv_heads:
        raise ValueError(f"q heads ({num_q_heads}) must be a multiple of kv heads ({num_kv_heads})")
    if tp > num_q_heads:
        raise ValueError(f"tp ({tp}) must not exceed the number of q heads ({num_q_heads})")
    group = num_q_heads // num_kv_heads
    out = []
    for q_start, q_end in contiguous_shards(num_q_heads, tp):
        kv_start, kv_end = q_start // group, (q_end - 1) // group + 1
        out.append(HeadShard(q_start, q_end, kv_start, kv_end, group))
    return out


def shard_qkv(
    w_qkv: torch.Tensor, num_q_heads: int, num_kv_heads: int, head_dim: int, tp_rank: int, tp: int
) -> torch.Tensor:
    """Rows of a fused QKV weight [(Hq + 2·Hkv)·D, in] (or bias [(Hq + 2·Hkv)·D]) for one rank.

    Input rows are ordered [q heads; k heads; v heads]; the result is
    [local q heads; local k heads; local v heads] ((nq + 2·nkv)·D rows), kv heads replicated as
    ``head_shards`` decides.
    """
    sh = head_shards(num_q_heads, num_kv_heads, tp)[tp_rank]
    q_rows = num_q_heads * head_dim
    kv_rows = num_kv_heads * head_dim
    if w_qkv.shape[0] != q_rows + 2 * kv_rows:
        raise ValueError(f"fused QKV has {w_qkv.shape[0]} rows, expected {q_rows + 2 * kv_rows}")
    q = w_qkv[sh.q_start * head_dim : sh.q_end * head_dim]
    k = w_qkv[q_rows + sh.kv_start * head_dim : q_rows + sh.kv_end * head_dim]
    v = w_qkv[q_rows + kv_rows + sh.kv_start * head_dim : q_rows + kv_rows + sh.kv_end * head_dim]
    return torch.cat([q, k, v])


def shard_o_proj(w_o: torch.Tensor, num_q_heads: int, head_dim: int, tp_rank: int, tp: int) -> torch.Tensor:
    """Columns of o_proj [hidden, Hq·D] matching this rank's q heads (row-parallel)."""
    sh = head_shards(num_q_heads, 1, tp)[tp_rank]
    return w_o[:, sh.q_start * head_dim : sh.q_end * head_dim]
