"""Comparing greedy token streams: a divergence counts only where the reference's top-2 logit margin
at that step was wide enough that rounding cannot explain it."""

from __future__ import annotations

import torch

NEAR_TIE = 1e-3  # fp32: logits from differently ordered reductions differ by ~1e-5; ties below this are noise


def top2_margin(logits: torch.Tensor) -> float:
    top = torch.topk(logits.float(), 2).values
    return float(top[0] - top[1])


def first_real_divergence(ref_tokens: list[int], ref_logits: torch.Tensor, got_tokens: list[int],
                          near_tie: float = NEAR_TIE) -> str | None:
    """None if ``got_tokens`` equals ``ref_tokens`` up to a first difference at a near-tie step
    (after which the streams may legitimately differ); else a description of the divergence.
    ``ref_logits``: [num_generated, V], the logits each reference token was sampled from."""
    if len(got_tokens) != len(ref_tokens):
        return f"{len(got_tokens)} tokens instead of {len(ref_tokens)}"
    for i, (a, b) in enumerate(zip(ref_tokens, got_tokens)):
        if a != b:
            margin = top2_margin(ref_logits[i])
            if margin >= near_tie:
                return f"token {i}: {b} instead of {a} where the top-2 margin was {margin:.2e}"
            return None
    return None
