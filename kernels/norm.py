"""RMSNorm, alone and after the residual add: the C++ kernels on the CPU, torch elsewhere, and the plain fp32
twin (Llama's definition) that tests hold both against."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from csps.kernels import cpu_ext


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # x: [T, H], weight: [H] -> [T, H]
    if cpu_ext.handles(x, weight) and x.dim() == 2 and x.stride(-1) == 1:
        return torch.ops.csps.rms_norm(x, weight, eps)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def add_rms_norm_(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x += delta in place (the residual stream), then rms_norm(x): one pass over the rows on the CPU."""
    # x, delta: [T, H], weight: [H] -> [T, H]
    if cpu_ext.handles(x, delta, weight) and x.dim() == 2 and x.stride(-1) == 1 and delta.stride(-1) == 1:
        return torch.ops.csps.add_rms_norm_(x, delta, weight, eps)
    x.add_(delta)
    return rms_norm(x, weight, eps)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's definition: normalise in fp32, cast back, then scale."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)
