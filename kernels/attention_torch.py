"""Attention in plain torch ops, returning ``(out, lse)`` with an fp32 log-sum-exp (the CPU path, and the
CUDA path where flash-attn is missing; ``attention.attention`` dispatches by device). Positions are
CPU tensors on every device: they steer which kernel calls run, without a device sync.

On CPU: torch's fused flash attention for CPU, which returns the LSE. Its ``is_causal`` mask is
top-left aligned, which is wrong for a chunk on top of cached KV (docs/platform.md), so the keys
are split by position into
  * keys every query sees (position below every query position): no mask at all;
  * keys whose positions equal the query positions (the chunk's own tokens): ``is_causal``;
  * the rest, for queries and keys at a few runs of consecutive positions (a zigzag of 2P pieces):
    per (query run, key run) pair, all visible, causal or skipped, still without a mask;
  * for many runs (the engine's zigzag in pieces of one KV block): query tiles, each seeing the
    keys below its lowest position unmasked and masking only the keys within its position span;
  * anything else (sliding windows, unsorted keys): an additive 0/-inf mask, in blocks;
and the parts are merged exactly by LSE. ``attention_ref`` in ``attention_ref.py`` is the oracle.

Decode (one query per sequence over a padded batch of gathered keys) runs batched in fp32: on this CPU,
bf16 attention for a single query is ~6x slower than fp32 (docs/platform.md). It is the plain-torch
twin of the paged decode kernel (``csps.kernels.decode``).
"""

from __future__ import annotations

import torch
from csps.kernels.attention_ref import visibility_mask
from csps.kernels.merge import merge_many

_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
MAX_MASK_ELEMS = 1 << 24  # keys are processed in blocks so a dense mask stays under ~64 MB


def _select(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """x[keep], as a view when ``keep`` is one contiguous run (the common case)."""
    idx = keep.nonzero().flatten()
    if idx.numel() and int(idx[-1]) - int(idx[0]) + 1 == idx.numel():
        return x[int(idx[0]) : int(idx[-1]) + 1]
    return x[idx]


def _flash(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    causal: bool = False,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    # q: [Tq, Hq, D], k/v: [Tk, Hkv, D], mask: bool [Tq, Tk] on the CPU (True = visible) or None;
    # causal only with Tq == Tk (the kernels align the diagonal differently otherwise)
    attn_mask = None
    if mask is not None:
        attn_mask = torch.zeros(mask.shape, dtype=q.dtype).masked_fill_(~mask, float("-inf"))
        attn_mask = attn_mask[None, None].to(q.device)
    if q.is_cuda:  # torch's CUDA kernels with a log-sum-exp (kernels/cuda_sdpa.py, imported lazily)
        from csps.kernels.cuda_sdpa import sdpa_with_lse

        out, lse = sdpa_with_lse(q, k, v, scale, causal, attn_mask)
    else:
        out, lse = _flash_cpu(
            q.transpose(0, 1)[None],
            k.transpose(0, 1)[None],
            v.transpose(0, 1)[None],
            dropout_p=0.0,
            is_causal=causal,
            attn_mask=attn_mask,
            scale=scale,
        )
        out = out[0].transpose(0, 1)  # [Tq, Hq, D]
        lse = lse[0].transpose(0, 1).float()  # [Tq, Hq]
    if mask is not None:
        # A row whose keys are all masked gets lse 0 (CPU) or -inf and NaN (CUDA): make it lse -inf, out 0.
        has_key = mask.any(-1)
        if not bool(has_key.all()):
            has_key = has_key.to(q.device)
            lse = torch.where(has_key[:, None], lse, float("-inf"))
            out = torch.where(has_key[:, None, None], out, 0.0)
    return out, lse


def attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    scale: float | None = None,
    sliding_window: int | None = None,
    *,
    max_run_pairs: int | None = None,
    q_tile: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of queries at positions q_pos over keys at positions k_pos.

    ``max_run_pairs`` / ``q_tile`` override ``MAX_RUN_PAIRS`` / ``Q_TILE`` (tests and benchmarks
    compare the paths; 0 disables one).

    q: [Tq, Hq, D], k/v: [Tk, Hkv, D], q_pos: [Tq], k_pos: [Tk] (int64).
    Returns out [Tq, Hq, D] (q's dtype) and lse [Tq, Hq] (fp32); rows with no visible key get
    out 0 and lse -inf.
    """
    tq, hq, d = q.shape
    scale = d**-0.5 if scale is None else scale
    if tq == 0 or k.shape[0] == 0:
        return q.new_zeros(q.shape), torch.full((tq, hq), float("-inf"), device=q.device)
    q_min, q_max = int(q_pos.min()), int(q_pos.max())
    seen_by_all = k_pos < q_min
    if sliding_window is not None:
        seen_by_all &= k_pos > q_max - sliding_window
    relevant = k_pos <= q_max
    if sliding_window is not None:
        relevant &= k_pos > q_min - sliding_window
    rest = relevant & ~seen_by_all
    parts: list[tuple[torch.Tensor, torch.Tensor]] = []
    if bool(seen_by_all.any()):
        parts.append(_flash(q, _select(k, seen_by_all), _select(v, seen_by_all), scale))
    if bool(rest.any()):
        k_rest, v_rest, pos_rest = _select(k, rest), _select(v, rest), _select(k_pos, rest)
        q_runs, k_runs = _runs(q_pos), _runs(pos_rest)
        max_run_pairs = MAX_RUN_PAIRS if max_run_pairs is None else max_run_pairs
        q_tile = Q_TILE if q_tile is None else q_tile
        if sliding_window is None and len(q_runs) * len(k_runs) <= max_run_pairs:
            # a zigzag of 2P pieces is a few runs of consecutive positions: each (query run, key run)
            # pair is all visible, causal, or invisible, so the fused kernel runs without a dense mask
            if len(q_runs) == 1:
                parts += _run_pairs(q, q_pos, k_rest, v_rest, pos_rest, k_runs, scale)
            else:
                out, lse = _attend_row_blocks(
                    q, q_pos, q_runs, parts,
                    lambda qq, pp: _run_pairs(qq, pp, k_rest, v_rest, pos_rest, k_runs, scale))
                return out.to(q.dtype), lse
        elif sliding_window is None and q_tile and _is_sorted(pos_rest):
            # the engine's granular zigzag (pieces of one KV block) has too many runs: take the
            # queries in tiles; each sees a prefix of the keys whole and masks only the keys that
            # fall among its own positions
            tiles = [(a, min(a + q_tile, tq)) for a in range(0, tq, q_tile)]
            out, lse = _attend_row_blocks(
                q, q_pos, tiles, parts, lambda qq, pp: _tile_parts(qq, pp, k_rest, v_rest, pos_rest, scale))
            return out.to(q.dtype), lse
        else:
            parts += _masked_parts(q, q_pos, k_rest, v_rest, pos_rest, scale, sliding_window)
    if not parts:
        return q.new_zeros(q.shape), torch.full((tq, hq), float("-inf"), device=q.device)
    return merge_many([o for o, _ in parts], [lse for _, lse in parts])


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_lens: torch.Tensor,
    scale: float | None = None,
    sliding_window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One query per sequence over padded per-sequence keys, in fp32.

    q: [B, Hq, D]; k/v: [B, L, Hkv, D] (padded; entries at index >= kv_lens[b] are ignored; the
    query sits after every key, so with a window only the last ``sliding_window`` keys count).
    Returns out [B, Hq, D] (q's dtype), lse [B, Hq] fp32 (-inf for a sequence with no keys).
    """
    b, hq, d = q.shape
    hkv = k.shape[2]
    scale = d**-0.5 if scale is None else scale
    qf = q.float().view(b, hkv, hq // hkv, d)  # [B, Hkv, G, D]
    kf, vf = k.float(), v.float()
    idx = torch.arange(k.shape[1], device=k.device)
    valid = idx[None, :] < kv_lens[:, None]  # [B, L]
    if sliding_window is not None:
        valid &= idx[None, :] >= kv_lens[:, None] - sliding_window
    has_key = (kv_lens > 0)[:, None]  # [B, 1]
    if b == 1:  # one sequence: a single einsum pass is cheapest
        scores = torch.einsum("bhgd,blhd->bhgl", qf, kf) * scale  # [B, Hkv, G, L]
        scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)  # [B, Hkv, G]
        probs = torch.exp(scores - torch.where(has_key[..., None], lse, 0.0)[..., None])
        out = torch.einsum("bhgl,blhd->bhgd", probs, vf)
    else:
        # a batch: one strided bmm pair per KV head reads the gathered [B, L, Hkv, D] cache without
        # the permuted copy einsum makes
        out = q.new_empty(b, hkv, hq // hkv, d, dtype=torch.float32)
        lse = q.new_empty(b, hkv, hq // hkv, dtype=torch.float32)
        for h in range(hkv):
            s = torch.bmm(qf[:, h], kf[:, :, h].transpose(1, 2)).mul_(scale)  # [B, G, L]
            s.masked_fill_(~valid[:, None, :], float("-inf"))
            lse[:, h] = torch.logsumexp(s, dim=-1)  # [B, G]
            s.sub_(torch.where(has_key, lse[:, h], 0.0)[..., None]).exp_()
            out[:, h] = torch.bmm(s, vf[:, :, h])  # [B, G, D]
    lse = torch.where(has_key.view(b, 1, 1), lse, float("-inf"))
    return out.reshape(b, hq, d).to(q.dtype), lse.reshape(b, hq)


MAX_RUN_PAIRS = 8  # (query run, key run) pairs, each a kernel call; beyond this, tiles (unsorted keys: masks)
Q_TILE = 256  # queries per tile on the tiled path; 0 disables it (one dense masked pass instead)


def _is_sorted(pos: torch.Tensor) -> bool:
    return bool((pos[1:] >= pos[:-1]).all())


def _runs(pos: torch.Tensor) -> list[tuple[int, int]]:
    """Index ranges [a, b) over which ``pos`` increases by exactly 1 (a zigzag shard has two)."""
    breaks = ((pos[1:] - pos[:-1]) != 1).nonzero().flatten().tolist()
    edges = [0] + [b + 1 for b in breaks] + [pos.shape[0]]
    return list(zip(edges[:-1], edges[1:]))


def _run_pairs(q, q_pos, k, v, k_pos, k_runs, scale) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Partial (out, lse) of one run of consecutive query positions over each key run it can see."""
    # q: [Tq, Hq, D] with q_pos consecutive; k/v: [Tk, Hkv, D]; k_runs: index ranges of consecutive k_pos
    q_lo, q_hi = int(q_pos[0]), int(q_pos[-1])
    parts = []
    for a, b in k_runs:
        k_lo, k_hi = int(k_pos[a]), int(k_pos[b - 1])
        if k_lo > q_hi:
            continue  # every key after every query
        if k_hi < q_lo:
            parts.append(_flash(q, k[a:b], v[a:b], scale))
        elif k_lo == q_lo and k_hi == q_hi:
            parts.append(_flash(q, k[a:b], v[a:b], scale, causal=True))
        else:
            mask = visibility_mask(q_pos, k_pos[a:b], None)
            parts.append(_flash(q, k[a:b], v[a:b], scale, mask=mask))
    return parts


def _tile_parts(q, q_pos, k, v, k_pos, scale) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Partial (out, lse) of a tile of queries over keys sorted by position.

    Keys below the tile's lowest position are all visible (one unmasked call); keys within its
    position span get a 0/-inf mask; later keys are invisible and skipped. A tile of T sorted
    queries of a zigzag share therefore masks only the keys within a span of ~P·T positions.
    """
    # q: [T, Hq, D], q_pos: [T]; k/v: [Tk, Hkv, D], k_pos: [Tk] ascending
    q_lo, q_hi = int(q_pos.min()), int(q_pos.max())
    i0 = int(torch.searchsorted(k_pos, q_lo))  # keys < q_lo
    i1 = int(torch.searchsorted(k_pos, q_hi, right=True))  # keys <= q_hi
    parts = []
    if i0:
        parts.append(_flash(q, k[:i0], v[:i0], scale))
    if i1 > i0:
        parts += _masked_parts(q, q_pos, k[i0:i1], v[i0:i1], k_pos[i0:i1], scale, None)
    return parts


def _masked_parts(q, q_pos, k, v, k_pos, scale, sliding_window) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Partial (out, lse) over keys with a dense 0/-inf mask, in blocks of keys so a mask stays
    under ``MAX_MASK_ELEMS`` elements."""
    step = max(1, MAX_MASK_ELEMS // max(1, q.shape[0]))
    parts = []
    for s in range(0, k_pos.shape[0], step):
        mask = visibility_mask(q_pos, k_pos[s : s + step], sliding_window)
        parts.append(_flash(q, k[s : s + step], v[s : s + step], scale, mask=mask))
    return parts


def _attend_row_blocks(q, q_pos, row_ranges, shared, parts_fn):
    """Attention per block of query rows ``[a, b)``: ``parts_fn(q[a:b], q_pos[a:b])`` gives its
    partial results, merged with the ``shared`` parts (keys every query sees) row-wise."""
    tq, hq, d = q.shape
    out = torch.zeros(tq, hq, d, dtype=torch.float32, device=q.device)
    lse = torch.full((tq, hq), float("-inf"), device=q.device)
    for a, b in row_ranges:
        parts = [(o[a:b], l[a:b]) for o, l in shared]
        parts += parts_fn(q[a:b], q_pos[a:b])
        if parts:
            o, l = merge_many([o for o, _ in parts], [l for _, l in parts])
            out[a:b], lse[a:b] = o.float(), l
    return out, lse
