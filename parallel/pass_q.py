"""Pass-Q attention: move the (small) queries to the KV instead of the KV to the queries.

Every rank sends its queries to every other rank (one all-to-all, kind "pass_q"); each rank runs
``local_attn`` on all received queries against ITS local KV (a closure, so decode can use a paged
cache); the partial ``(out, lse)`` go back to their source rank (one all-to-all, kind
"pass_q_out"), which merges the P partials exactly by log-sum-exp. Traffic depends on the number
of queries, never on the context length: for decode, the owner of a sequence contributes its one
query and every other rank contributes 0 queries.

Bytes sent by rank r (Tq_j = num_q_per_rank[j], e = q's element size):
  pass_q      (P - 1) · Tq_r · Hq · D · e
  pass_q_pos  (P - 1) · Tq_r · 8            (only when ``q_pos_per_rank`` is not given)
  pass_q_out  sum_{j != r} Tq_j · Hq · (D · e + 4)   (partial out in q's dtype + fp32 lse, packed)
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from csps.kernels import attention, merge_many
from csps.parallel.comm import Comm

LocalAttn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def local_attn_from_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_pos: torch.Tensor,
    attn_fn: Callable[..., tuple[torch.Tensor, torch.Tensor]] = attention,
    scale: float | None = None,
    sliding_window: int | None = None,
) -> LocalAttn:
    """A ``local_attn`` over dense local KV. k/v: [Tk, Hkv, D], k_pos: [Tk] int64."""

    def local_attn(q: torch.Tensor, q_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # q: [T, Hq, D], q_pos: [T] -> out [T, Hq, D], lse [T, Hq]
        return attn_fn(q, k, v, q_pos, k_pos, scale=scale, sliding_window=sliding_window)

    return local_attn


def _pack(out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """lse [T, H] fp32 and out [T, H, D] (any dtype) -> uint8 [T * H * (4 + D*e)], lse first."""
    as_bytes = [x.contiguous().view(-1).view(torch.uint8) for x in (lse, out)]
    return torch.cat(as_bytes)


def _unpack(
    buf: torch.Tensor, t: int, h: int, d: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of ``_pack``. buf: uint8 [T * H * (4 + D*e)]."""
    if buf.storage_offset() % 8:  # a dtype view needs an aligned start
        buf = buf.clone()
    n_lse = t * h * 4
    lse = buf[:n_lse].view(torch.float32).view(t, h)
    out = buf[n_lse:].view(dtype).view(t, h, d)
    return out, lse


def pass_q_attention(
    q: torch.Tensor,
    q_pos: torch.Tensor,
    comm: Comm,
    local_attn: LocalAttn,
    num_q_per_rank: Sequence[int],
    q_pos_per_rank: Sequence[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of this rank's queries over the KV of every rank in ``comm``.

    q: [Tq, Hq, D] with Tq = num_q_per_rank[comm.rank], q_pos: [Tq] int64.
    local_attn(q [T, Hq, D], q_pos [T]) -> (out [T, Hq, D], lse [T, Hq] fp32) over the local KV; it
    is called ONCE per rank with the queries of all ranks concatenated in source-rank order
    (rank 0's first), so a closure that knows ``num_q_per_rank`` can tell them apart.
    q_pos_per_rank: every rank's query positions, if the caller knows them (then no position
    traffic). Returns out [Tq, Hq, D] in q's dtype and lse [Tq, Hq] fp32.
    Collective: every rank of ``comm`` calls it, including ranks with 0 queries.
    """
    num_ranks, me = comm.size, comm.rank
    if len(num_q_per_rank) != num_ranks or q.shape[0] != num_q_per_rank[me]:
        raise ValueError(f"q has {q.shape[0]} rows; num_q_per_rank={list(num_q_per_rank)}, rank {me}")
    if num_ranks == 1:
        out, lse = local_attn(q, q_pos)
        return out.to(q.dtype), lse
    _, hq, d = q.shape
    counts = [int(n) for n in num_q_per_rank]

    # 1. queries (and positions) to every rank.
    all_q = comm.all_to_all([q] * num_ranks, [(n, hq, d) for n in counts], "pass_q")
    if q_pos_per_rank is None:
        all_pos = comm.all_to_all([q_pos] * num_ranks, [(n,) for n in counts], "pass_q_pos")
    else:
        all_pos = list(q_pos_per_rank)

    # 2. one local partial attention over every source's queries.
    out_all, lse_all = local_attn(torch.cat(all_q), torch.cat(all_pos))
    outs = out_all.to(q.dtype).split(counts)
    lses = lse_all.float().split(counts)

    # 3. partials back to their source (packed out + lse), then an exact merge.
    send = [_pack(o, l) for o, l in zip(outs, lses)]
    row_bytes = hq * (d * q.element_size() + 4)
    recv = comm.all_to_all(send, [(counts[me] * row_bytes,)] * num_ranks, "pass_q_out")
    parts = [_unpack(b, counts[me], hq, d, q.dtype) for b in recv]
    out, lse = merge_many([o for o, _ in parts], [l for _, l in parts])
    return out.to(q.dtype), lse
