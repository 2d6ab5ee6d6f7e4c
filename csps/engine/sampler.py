"""Choosing the next token from logits: penalties, temperature, top-k/top-p/min-p, seeds, logprobs."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from csps.core.sampling_params import SamplingParams


@dataclass
class SampleRow:
    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]
    generator: torch.Generator | None = None


@dataclass
class Sampled:
    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)


def apply_penalties(logits: torch.Tensor, p: SamplingParams, prompt_ids: list[int], output_ids: list[int]) -> torch.Tensor:
    # logits: [V] fp32 (a copy is modified)
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
    """Mask logits outside top-k / top-p / min-p with -inf. logits: [V] fp32 (already scaled)."""
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


def sample(logits: torch.Tensor, rows: list[SampleRow]) -> list[Sampled]:
    """logits: [N, V] fp32, one row per request -> one Sampled per row."""
    if all(r.params.greedy and not r.params.needs_penalties and r.params.logprobs is None for r in rows):
        return [Sampled(int(t)) for t in logits.argmax(-1).tolist()]
    want_logprobs = any(r.params.logprobs is not None for r in rows)
    raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
    out = []
    for i, r in enumerate(rows):
        p = r.params
        row = logits[i]
        if p.needs_penalties:
            row = apply_penalties(row.clone(), p, r.prompt_ids, r.output_ids)
        if p.greedy:
            token = int(row.argmax())
        else:
            row = filter_logits(row / p.temperature, p)
            probs = torch.softmax(row, dim=-1)
            # exponential race: argmax(p / E), E ~ Exp(1), draws token i with probability p_i
            # (one vectorised pass; torch.multinomial over a 49k vocabulary is several times slower)
            race = torch.empty_like(probs).exponential_(generator=r.generator)
            token = int((probs / race).argmax())
        s = Sampled(token)
        if raw_logprobs is not None and p.logprobs is not None:
            lp = raw_logprobs[i]
            s.logprob = float(lp[token])
            if p.logprobs > 0:
                top = torch.topk(lp, p.logprobs)
                s.top_logprobs = list(zip(top.indices.tolist(), top.values.tolist()))
        out.append(s)
    return out
