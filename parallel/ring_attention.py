"""Pass-KV ring attention over the SP group.

Every rank holds its queries and a block of keys/values (whatever placement: contiguous or zigzag
shards of a whole prompt, or its cached tokens plus its share of a new prefill chunk). Visibility
is decided by positions only, so every placement is handled by one rule. For P - 1 steps, each
rank starts sending the KV block in hand to the next rank (receiving the previous rank's block),
computes attention of its queries on the block in hand, waits, and folds the partial result in by
log-sum-exp. Positions never travel: every rank knows every rank's key positions, so receive sizes
are known in advance.

At step s rank r holds the block of rank (r - s) mod P; over P - 1 steps it sends the blocks of
every rank except (r + 1) mod P, so its "pass_kv" bytes are
``sum_{j != r+1} 2 * len(k_pos_per_rank[j]) * Hkv * D * elem_bytes`` (~ 2·g·N·d·e, independent of P).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from csps.kernels import attention, merge_attn
from csps.parallel.comm import Comm

AttnFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def ring_attention(
    q: torch.Tensor,
    q_pos: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_pos_per_rank: Sequence[torch.Tensor],
    comm: Comm,
    attn_fn: AttnFn = attention,
    scale: float | None = None,
    sliding_window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of this rank's queries over the keys of every rank in ``comm``.

    q: [Tq, Hq, D], q_pos: [Tq] int64; k/v: [Tk_r, Hkv, D] (this rank's block);
    k_pos_per_rank[j]: [Tk_j] int64 key positions of rank j (k_pos_per_rank[comm.rank] matches k).
    attn_fn: (q, k, v, q_pos, k_pos, scale=, sliding_window=) -> (out, lse), e.g. ``attention``.
    Returns out [Tq, Hq, D] in q's dtype, lse [Tq, Hq] fp32 (-inf for queries that see no key).
    Collective: every rank of ``comm`` must call it (ranks may have 0 queries or 0 keys).
    """
    num_ranks, me = comm.size, comm.rank
    if len(k_pos_per_rank) != num_ranks:
        raise ValueError(f"k_pos_per_rank has {len(k_pos_per_rank)} entries for {num_ranks} ranks")
    if k.shape[0] != k_pos_per_rank[me].shape[0] or v.shape[0] != k.shape[0]:
        raise ValueError(
            f"local k/v have {k.shape[0]}/{v.shape[0]} tokens, positions say {k_pos_per_rank[me].shape[0]}"
        )
    tq, hq, d = q.shape
    hkv, dv = k.shape[1], v.shape[2]
    q_max = int(q_pos.max()) if tq else None
    k_min = [int(p.min()) if p.numel() else None for p in k_pos_per_rank]

    out = torch.zeros(tq, hq, dv, dtype=torch.float32, device=q.device)  # running result, fp32 between merges
    lse = torch.full((tq, hq), float("-inf"), device=q.device)
    blk_k, blk_v, src = k, v, me
    for step in range(num_ranks):
        handle = None
        if step < num_ranks - 1:
            nxt_src = (src - 1) % num_ranks  # the previous rank holds that block now
            n_next = k_pos_per_rank[nxt_src].shape[0]
            handle = comm.ring_send_recv(
                [blk_k, blk_v], [((n_next, hkv, d), k.dtype), ((n_next, hkv, dv), v.dtype)], "pass_kv"
            )
        # Skip blocks no query can see (empty, or every key after every query).
        if tq and k_min[src] is not None and k_min[src] <= q_max:
            o, l = attn_fn(
                q, blk_k, blk_v, q_pos, k_pos_per_rank[src], scale=scale, sliding_window=sliding_window
            )
            out, lse = merge_attn(out, lse, o, l)
        if handle is not None:
            blk_k, blk_v = handle.wait()
            src = nxt_src
    return out.to(q.dtype), lse
