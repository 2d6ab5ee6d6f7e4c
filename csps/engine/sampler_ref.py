"""The sampler's rules for one row at a time, in plain torch: the oracle the batched sampler
(``sampler.py``) is tested against. Nothing in the engine calls these."""

from __future__ import annotations

import torch

from csps.core.sampling_params import SamplingParams


def apply_penalties(logits: torch.Tensor, p: SamplingParams, prompt_ids: list[int], output_ids: list[int]) -> torch.Tensor:
    """Repetition penalty over prompt and output tokens, presence/frequency over output tokens.
    logits: [V] fp32 (modified in place and returned)."""
    vocab = logits.shape[0]
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted({t for t in prompt_ids + output_ids if t < vocab}), dtype=torch.int64)
        if seen.numel():
            vals = logits[seen]
            logits[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and output_ids:
        ids = torch.tensor([t for t in output_ids if t < vocab], dtype=torch.int64)
        counts = torch.bincount(ids, minlength=vocab).float()
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
    return logits


def filter_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Mask logits outside top-k, then min-p and top-p (both on the top-k distribution) with -inf.
    logits: [V] fp32 (already divided by the temperature)."""
    if p.top_k and p.top_k < logits.shape[0]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0 or p.min_p > 0.0:
        probs = torch.softmax(logits, dim=-1)
        if p.min_p > 0.0:
            logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            drop_sorted = (torch.cumsum(sorted_probs, 0) - sorted_probs) > p.top_p
            drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
    return logits
