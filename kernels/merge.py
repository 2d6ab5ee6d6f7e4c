"""Exact merge of partial attention results by log-sum-exp.

Two partial results over disjoint key sets, ``(o1, l1)`` and ``(o2, l2)``, combine into the
attention over the union: ``l = logaddexp(l1, l2)``, ``o = o1·e^(l1-l) + o2·e^(l2-l)``. A row that has
seen no keys yet carries ``l = -inf`` and ``o = 0``; the merge keeps it -inf and never produces NaN
(the sigmoid form used by ring-flash-attn does: see docs/anchors.md).
"""

from __future__ import annotations

import torch


def merge_attn(
    o1: torch.Tensor, l1: torch.Tensor, o2: torch.Tensor, l2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """o*: [T, H, D] (any float dtype), l*: [T, H] fp32. Returns (out in o1's dtype, lse fp32)."""
    lse = torch.logaddexp(l1, l2)  # -inf only where both are -inf
    safe = torch.where(torch.isinf(lse), 0.0, lse)  # avoid (-inf) - (-inf) = NaN
    w1 = torch.exp(l1 - safe)[..., None]  # exp(-inf) = 0 for rows without keys
    w2 = torch.exp(l2 - safe)[..., None]
    out = o1.float() * w1 + o2.float() * w2
    return out.to(o1.dtype), lse


def merge_many(
    outs: list[torch.Tensor], lses: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge any number of partials at once. outs: P × [T, H, D], lses: P × [T, H] fp32."""
    if len(outs) == 1:
        return outs[0], lses[0]
    lse_stack = torch.stack(lses)  # [P, T, H]
    lse = torch.logsumexp(lse_stack, dim=0)  # [T, H]
    safe = torch.where(torch.isinf(lse), 0.0, lse)
    weights = torch.exp(lse_stack - safe)[..., None]  # [P, T, H, 1]
    out = (torch.stack([o.float() for o in outs]) * weights).sum(0)
    return out.to(outs[0].dtype), lse
