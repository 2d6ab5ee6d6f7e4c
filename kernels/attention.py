"""Attention returning ``(out, lse)``: the device dispatch.

CUDA tensors go to ``cuda_attention`` (flash-attn when installed, imported lazily; it falls back to
the torch path itself); on CPU a chunk over its sequence's whole prefix goes to the C++ kernel where it is
faster (``prefill``), everything else runs ``attention_torch``. Callers import ``attention`` from
``csps.kernels`` and never choose a backend themselves.
"""

from __future__ import annotations

import torch
from csps.kernels.attention_torch import attention_torch
from csps.kernels.prefill import prefill_attention, uses_prefill_kernel


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    scale: float | None = None,
    sliding_window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of queries at positions q_pos over keys at positions k_pos (see ``attention_torch``).

    q: [Tq, Hq, D], k/v: [Tk, Hkv, D], q_pos: [Tq], k_pos: [Tk] (int64) -> out [Tq, Hq, D] (q's
    dtype), lse [Tq, Hq] (fp32); rows with no visible key get out 0 and lse -inf.
    """
    if q.is_cuda:
        from csps.kernels.cuda_attention import flash_prefill

        return flash_prefill(q, k, v, q_pos, k_pos, q.shape[-1] ** -0.5 if scale is None else scale, sliding_window)
    if uses_prefill_kernel(q, k, q_pos, k_pos, sliding_window):
        return prefill_attention(q, k, v, int(q_pos[0]), q.shape[-1] ** -0.5 if scale is None else scale)
    return attention_torch(q, k, v, q_pos, k_pos, scale, sliding_window)

