"""torch's own CUDA attention kernels, returning ``(out, lse)``: the CUDA path where flash-attn is missing.

``attention_torch`` runs its position logic (which keys each query sees) on every device and calls these
kernels for CUDA tensors; nothing here runs on the CPU, and nothing imports flash-attn.
"""

from __future__ import annotations

import torch

FLASH_DTYPES = (torch.float16, torch.bfloat16)  # what flash kernels (flash-attn's and torch's) take
MAX_HEAD_DIM = 256


def sdpa_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool = False,
                  attn_bias: torch.Tensor | None = None, *, flash_op=None, efficient_op=None,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's own CUDA attention kernels with a log-sum-exp (the CUDA path without flash-attn).

    q: [Tq, Hq, D], k/v: [Tk, Hkv, D] (GQA: KV heads repeated); attn_bias: additive [1, 1, Tq, Tk] or
    None; causal only with Tq == Tk. fp16/bf16 without a bias: ``_scaled_dot_product_flash_attention``
    (lse [B, H, Tq] fp32); otherwise ``_scaled_dot_product_efficient_attention`` with
    ``compute_log_sumexp`` (any float dtype, a bias; lse [B, H, ceil(Tq/32)*32], cut to Tq).
    Returns out [Tq, Hq, D] in q's dtype, lse [Tq, Hq] fp32. ``flash_op`` / ``efficient_op`` default to
    those aten ops (tests pass torch models of their documented semantics).
    """
    tq, hq, d = q.shape
    g = hq // k.shape[1]
    if g > 1:
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    qq, kk, vv = (x.transpose(0, 1)[None] for x in (q, k, v))  # [1, H, T, D]
    if attn_bias is None and q.dtype in FLASH_DTYPES and d <= MAX_HEAD_DIM:
        op = flash_op or torch.ops.aten._scaled_dot_product_flash_attention
        out, lse = op(qq, kk, vv, 0.0, causal, False, scale=scale)[:2]
    else:
        op = efficient_op or torch.ops.aten._scaled_dot_product_efficient_attention
        out, lse = op(qq, kk, vv, attn_bias, True, 0.0, causal, scale=scale)[:2]
    return out[0].transpose(0, 1), lse[0, :, :tq].transpose(0, 1).float()
