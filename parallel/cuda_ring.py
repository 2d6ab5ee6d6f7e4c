"""Whole-prompt zigzag ring prefill through ring-flash-attn (imported lazily), else the csps ring.

Layout (``zigzag_shards``): a prompt of n tokens (positions 0..n-1, no cached KV) is cut into 2P
pieces; rank r holds pieces r and 2P-1-r, concatenated: q [T_r, Hq, D], k/v [T_r, Hkv, D].

ring-flash-attn path (zhuzilin/ring-flash-attention, read at ``ring_flash_attn/
zigzag_ring_flash_attn.py``; PyPI 0.1.x): ``zigzag_ring_flash_attn_func(q, k, v, dropout_p=0.0,
softmax_scale=None, causal=False, window_size=(-1, -1), alibi_slopes=None, deterministic=False,
return_attn_probs=False, group=None)`` on local shards [B, S/P, H, D] returns ``(out [B, S/P, H, D]
in q's dtype, lse [B, H, S/P] fp32, None)`` with ``return_attn_probs=True``. It asserts
``causal=True``, splits the local block into two equal halves (so n % 2P == 0: equal pieces), and
has no correct sliding window for the off-diagonal steps, so it is used only for CUDA fp16/bf16
tensors, P > 1, n % 2P == 0, no window. Anything else runs ``ring_attention`` with the zigzag
positions (a CPU kernel: CUDA tensors are copied to the CPU, which needs a gloo group).

Bytes: ring-flash-attn runs its own batched isend/irecv on ``comm.process_group``, bypassing
``Comm``; we count "pass_kv" from shapes with ``ring_attention``'s formula: over P - 1 steps rank
r sends every rank's K/V block except rank r+1's, ``sum_{j != r+1} T_j * Hkv * (D_k + D_v) * e``.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.distributed as dist
from csps.kernels.cuda_attention import (
    FLASH_DTYPES,
    MAX_HEAD_DIM,
    flash_available,
    flash_prefill,
)
from csps.parallel.comm import Comm
from csps.parallel.ring_attention import ring_attention
from csps.parallel.sharding import shard_indices, shard_sizes, zigzag_shards

log = logging.getLogger(__name__)


@functools.cache
def _ring_flash_module():
    """The ring_flash_attn module, or None (logged once). Needs flash-attn first."""
    if not flash_available():
        return None
    try:
        import ring_flash_attn
    except ImportError as e:
        log.info("ring-flash-attn not available (%s): using the csps ring", e)
        return None
    return ring_flash_attn


def ring_flash_available() -> bool:
    """True when ring-flash-attn (and flash-attn) import. Cached."""
    return _ring_flash_module() is not None


def _ring_flash(q: torch.Tensor, k: torch.Tensor, num_tokens: int, comm: Comm):
    """The ring_flash_attn module when it can run this ring exactly, else None.

    Every rank must decide alike (or the ring hangs): the test uses only facts shared by all ranks.
    ring-flash-attn orders the ring by group rank, which must match ``comm.ranks``.
    """
    p = comm.size
    ok = (
        p > 1 and q.is_cuda and q.dtype in FLASH_DTYPES and k.dtype == q.dtype
        and num_tokens > 0 and num_tokens % (2 * p) == 0 and q.shape[-1] <= MAX_HEAD_DIM
    )
    if not ok or dist.get_process_group_ranks(comm.process_group) != comm.ranks:
        return None
    return _ring_flash_module()


def ring_pass_kv_bytes(tokens_per_rank: list[int], rank: int, k: torch.Tensor, v: torch.Tensor) -> int:
    """Bytes rank ``rank`` sends in a pass-KV ring (k/v: this rank's [T, Hkv, D] blocks)."""
    p = len(tokens_per_rank)
    per_token = k.shape[1] * k.shape[2] * k.element_size() + v.shape[1] * v.shape[2] * v.element_size()
    return sum(t * per_token for j, t in enumerate(tokens_per_rank) if j != (rank + 1) % p) if p > 1 else 0


def zigzag_ring_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    comm: Comm,
    scale: float | None = None,
    num_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of a whole prompt, zigzag-sharded over ``comm``; collective.

    q: [T_r, Hq, D], k/v: [T_r, Hkv, D] (this rank's zigzag shard, pieces r then 2P-1-r).
    num_tokens: the prompt length n (default P * T_r, right when every rank holds T_r tokens; pass
    it when n % 2P != 0 and shards differ). Returns out [T_r, Hq, D] (q's dtype), lse [T_r, Hq] fp32.
    """
    p, r = comm.size, comm.rank
    t, hq, d = q.shape
    n = p * t if num_tokens is None else num_tokens
    shards = zigzag_shards(n, p)
    sizes = shard_sizes(shards)
    if sizes[r] != t or k.shape[0] != t or v.shape[0] != t:
        raise ValueError(f"rank {r} holds q/k/v of {t}/{k.shape[0]}/{v.shape[0]} tokens; the zigzag "
                         f"shard of a {n}-token prompt over {p} ranks has {sizes[r]}")
    scale = d**-0.5 if scale is None else scale
    positions = [shard_indices(s) for s in shards]
    if p == 1:
        return flash_prefill(q, k, v, positions[0], positions[0], scale)
    rf = _ring_flash(q, k, n, comm)
    if rf is not None:
        out, lse, _ = rf.zigzag_ring_flash_attn_func(
            q[None], k[None], v[None], softmax_scale=scale, causal=True,
            return_attn_probs=True, group=comm.process_group,
        )
        comm.count("pass_kv", ring_pass_kv_bytes(sizes, r, k, v))
        return out[0], lse[0].transpose(0, 1).float().contiguous()
    device = q.device
    if device.type != "cpu":
        backend = dist.get_backend(comm.process_group)
        if backend != "gloo":
            raise RuntimeError(f"zigzag_ring_prefill: no ring-flash-attn path for these inputs, and the "
                               f"csps ring runs on the CPU, which the {backend!r} group cannot carry")
        q, k, v = q.cpu(), k.cpu(), v.cpu()
    out, lse = ring_attention(q, positions[r], k, v, positions, comm, scale=scale)
    return out.to(device), lse.to(device)
