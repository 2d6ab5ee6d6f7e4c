"""CUDA attention through flash-attn 2 (imported lazily), with the torch path as fallback.

Same contract as ``csps.kernels.attention_torch``: out in q's dtype, lse fp32 [T, Hq], out 0 / lse -inf
for rows with no visible key; the query at p sees the key at s iff ``s <= p`` (and ``p - s < W``).

flash-attn facts used (>= 2.6; read in Dao-AILab/flash-attention v2.8.3: the docstrings of
``flash_attn/flash_attn_interface.py`` and ``csrc/flash_attn/flash_api.cpp``):
  * masks are bottom-right aligned: with ``window_size=(left, right)`` (-1 = unbounded) query i of
    Tq sees key j of Tk iff ``i + Tk - Tq - left <= j <= i + Tk - Tq + right``; causal = right 0;
  * ``flash_attn_func(q, k, v, ..., return_attn_probs=True) -> (out [B,Tq,H,D], lse [B,H,Tq] fp32,
    S_dmask)``; GQA native (Hq % Hkv == 0); fp16/bf16 only; head dim <= 256;
  * a row that sees no key gets out 0 and lse **+inf** (turned into -inf here);
  * ``flash_attn_with_kvcache(q [B,Tq,H,D], k_cache, v_cache, cache_seqlens=int32 [B],
    block_table=int32 [B, nb], ..., return_softmax_lse=True) -> (out, lse [B,H,Tq])``; a paged
    block must hold a multiple of 256 tokens, so smaller blocks are gathered into a contiguous
    [B, L, Hkv, D] cache passed without ``block_table``.

Prefill takes any positions: both lists are cut into runs of consecutive positions; each (query
run, key run) pair, trimmed to the keys some query sees, is one flash call whose bottom-right band
is exactly the position rule; keys every query of a run sees go in one unmasked call; partials
merge by LSE. A chunk on contiguous cached KV (q = [C, C+T), k = [0, C+T)) is one causal call.

Fallback (no flash-attn, fp32, head dim > 256): ``attention_torch`` / ``decode_attention`` on the same
device; on CUDA their kernel calls are torch's own (``sdpa_with_lse``: the flash SDPA op, or the
memory-efficient one where a mask or fp32 needs it), both with a log-sum-exp.
"""

from __future__ import annotations

import functools
import logging
import re

import torch
from csps.kernels.attention_torch import _select, attention_torch, decode_attention
from csps.kernels.cuda_sdpa import FLASH_DTYPES, MAX_HEAD_DIM
from csps.kernels.merge import merge_attn
from csps.kernels.paged import gather_kv_padded

log = logging.getLogger(__name__)

MIN_FLASH_VERSION = (2, 6)
PAGED_BLOCK_MULTIPLE = 256  # flash-attn 2 paged KV: page_block_size % 256 == 0


@functools.cache
def _flash_module():
    """The flash_attn module, or None (logged once)."""
    try:
        import flash_attn
    except ImportError:
        log.info("flash-attn not installed: using the torch attention path")
        return None
    version = tuple(int(x) for x in re.findall(r"\d+", getattr(flash_attn, "__version__", "0"))[:2])
    if version < MIN_FLASH_VERSION or not hasattr(flash_attn, "flash_attn_with_kvcache"):
        log.info("flash-attn %s is unusable (need >= 2.6 with its CUDA extension): using the torch "
                 "attention path", getattr(flash_attn, "__version__", "?"))
        return None
    return flash_attn


def flash_available() -> bool:
    """True when flash-attn (>= 2.6, with its CUDA extension) imports. Cached."""
    return _flash_module() is not None


def _native(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """The flash_attn module when it can run these tensors, else None."""
    ok = (
        q.is_cuda and q.dtype in FLASH_DTYPES and k.dtype == q.dtype and v.dtype == q.dtype
        and max(q.shape[-1], v.shape[-1]) <= MAX_HEAD_DIM and q.shape[-2] % k.shape[-2] == 0
    )
    return _flash_module() if ok else None


def _no_key_rows(out: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """flash-attn marks rows without keys with lse = +inf: make them out 0, lse -inf (fp32)."""
    lse = lse.float()
    empty = torch.isinf(lse)
    return out.masked_fill(empty[..., None], 0.0), lse.masked_fill(empty, float("-inf"))


def _runs(pos: torch.Tensor) -> list[tuple[int, int, int]]:
    """Maximal runs of consecutive positions: (start index, end index, first position)."""
    n = pos.numel()
    if n == 0:
        return []
    cuts = (torch.nonzero(pos[1:] != pos[:-1] + 1).flatten() + 1).tolist()
    starts = [0] + cuts
    return list(zip(starts, cuts + [n], pos[starts].tolist()))


def _blocks(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None):
    """Flash calls that together give attention by positions.

    Yields (query rows: slice, keys: slice or bool mask [Tk], left, right), the flash window of the
    call. q_pos/k_pos: CPU int64. Every query row of a call sees at least one of its keys.
    """
    k_runs = _runs(k_pos)
    for qs, qe, a in _runs(q_pos):
        b = a + qe - qs  # this query run holds positions [a, b)
        # Keys in [f_lo, a) are seen by every query of the run: one unmasked call for all of them.
        f_lo = None if window is None else b - window
        split = len(k_runs) > 1 and (f_lo is None or f_lo < a)
        if split:
            full = (k_pos < a) if f_lo is None else (k_pos < a) & (k_pos >= f_lo)
            if bool(full.any()):
                yield slice(qs, qe), full, -1, -1
        for ks, ke, c in k_runs:
            d = c + ke - ks
            parts = [(c, d)]
            if split:
                parts = [(max(c, a), d)] if f_lo is None else [(c, min(d, f_lo)), (max(c, a), d)]
            for lo, hi in parts:
                lo = lo if window is None else max(lo, a - window + 1)  # oldest key any query sees
                hi = min(hi, b)  # no query sees a key after b - 1
                q_lo, q_hi = max(a, lo), b if window is None else min(b, hi + window - 1)
                if lo >= hi or q_lo >= q_hi:
                    continue
                right = q_hi - hi  # bottom-right band: see the module docstring
                left = -1 if window is None else window - 1 - right
                if right >= q_hi - q_lo - 1 and (left < 0 or left >= hi - lo - 1):
                    left, right = -1, -1  # every query sees every key: no mask
                yield slice(qs + q_lo - a, qs + q_hi - a), slice(ks + lo - c, ks + hi - c), left, right


def _band(fa, q, k, v, scale: float, left: int, right: int):
    # q: [Tq, Hq, D], k/v: [Tk, Hkv, D] -> out [Tq, Hq, D], lse [Tq, Hq] fp32
    out, lse, _ = fa.flash_attn_func(
        q[None], k[None], v[None], softmax_scale=scale, causal=False,
        window_size=(left, right), return_attn_probs=True,
    )
    return _no_key_rows(out[0], lse[0].transpose(0, 1))


def flash_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    scale: float | None = None,
    sliding_window: int | None = None,
    *,
    flash=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``attention`` on flash-attn. q: [Tq, Hq, D], k/v: [Tk, Hkv, D], q_pos/k_pos: int64 (CPU).

    Returns out [Tq, Hq, D] (q's dtype), lse [Tq, Hq] fp32 (-inf for rows with no visible key).
    ``flash``: the flash_attn module to call (default: the installed one, when it can run these tensors).
    """
    tq, hq, d = q.shape
    scale = d**-0.5 if scale is None else scale
    fa = flash or _native(q, k, v)
    if fa is None:  # torch's kernels on the same device (CUDA ones via sdpa_with_lse)
        return attention_torch(q, k, v, q_pos, k_pos, scale, sliding_window)
    if tq == 0 or k.shape[0] == 0:
        return q.new_zeros(q.shape), torch.full((tq, hq), float("-inf"), device=q.device)
    blocks = list(_blocks(q_pos.cpu(), k_pos.cpu(), sliding_window))
    out = torch.zeros(tq, hq, v.shape[-1], dtype=torch.float32, device=q.device)
    lse = torch.full((tq, hq), float("-inf"), device=q.device)
    for rows, keys, left, right in blocks:
        kk, vv = (k[keys], v[keys]) if isinstance(keys, slice) else (_select(k, keys), _select(v, keys))
        o, l = _band(fa, q[rows], kk, vv, scale, left, right)
        if len(blocks) == 1 and rows == slice(0, tq):
            return o, l
        out[rows], lse[rows] = merge_attn(out[rows], lse[rows], o, l)
    return out.to(q.dtype), lse


def flash_decode_paged(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cache_seqlens: torch.Tensor,
    scale: float | None = None,
    sliding_window: int | None = None,
    *,
    flash=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One query per sequence over the paged cache (the query's own key is already cached).

    q: [B, Hq, D]; k/v_cache: [num_blocks, block_size, Hkv, D]; block_tables: [B, nb] (padded
    with block 0); cache_seqlens: [B] keys per sequence (the query sits at cache_seqlens - 1).
    Returns out [B, Hq, D] (q's dtype), lse [B, Hq] fp32, like ``decode_attention``.
    """
    b, hq, d = q.shape
    scale = d**-0.5 if scale is None else scale
    fa = flash or _native(q, k_cache, v_cache)
    if fa is None or b == 0:
        kc, vc = gather_kv_padded(k_cache, v_cache, block_tables.to(k_cache.device).long())
        return decode_attention(q, kc, vc, cache_seqlens.to(k_cache.device), scale, sliding_window)
    kwargs = dict(
        cache_seqlens=cache_seqlens.to(q.device, torch.int32), softmax_scale=scale, causal=True,
        window_size=(-1, -1) if sliding_window is None else (sliding_window - 1, 0),
        return_softmax_lse=True,
    )
    if k_cache.shape[1] % PAGED_BLOCK_MULTIPLE == 0:
        tables = block_tables.to(q.device, torch.int32).contiguous()
        out, lse = fa.flash_attn_with_kvcache(q[:, None], k_cache, v_cache, block_table=tables, **kwargs)
    else:  # pages too small for flash-attn 2: a contiguous [B, nb * block_size, Hkv, D] copy
        kc, vc = gather_kv_padded(k_cache, v_cache, block_tables.to(q.device).long())
        out, lse = fa.flash_attn_with_kvcache(q[:, None], kc, vc, **kwargs)
    return _no_key_rows(out[:, 0], lse[..., 0])
