"""Choosing the next token of every sampled row of a step at once: penalties, temperature,
top-k/top-p/min-p, seeds, logprobs.

Everything is a tensor operation over the batch ``[N, V]``; Python touches each row only to read its
parameters (O(batch) per step, never O(context)). Penalties read each request's ``RequestSampler``:
which tokens it has seen (prompt and output, for the repetition penalty) and how often it produced
each (presence/frequency), built once from the prompt and then updated with each new token. Random
rows draw by inverse CDF: one uniform number per row, found in the row's running sum of probabilities
(picks token i with probability p_i), from the engine's generator; a request with a seed draws its number
from its own generator, so its tokens do not depend on what else is in the batch (as vLLM does).
The per-row rules, in plain torch, are in ``sampler_ref.py``: the oracle of this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from csps.core.sampling_params import SamplingParams


@dataclass
class RequestSampler:
    """What sampling remembers about one request between steps."""

    generator: torch.Generator | None = None  # the request's seed, if it gave one (on the logits' device)
    seen: torch.Tensor | None = None  # bool [V]: tokens in the prompt or output (repetition penalty)
    counts: torch.Tensor | None = None  # fp32 [V]: how often each token was generated (presence/frequency)
    num_folded: int = 0  # output tokens already counted in seen/counts

    def fold(self, p: SamplingParams, prompt_ids: list[int], output_ids: list[int], vocab: int,
             device: torch.device) -> None:
        """Bring seen/counts up to date: the prompt once, then only the tokens generated since."""
        new = output_ids[self.num_folded :]

        def ids(x: list[int]) -> torch.Tensor:
            return torch.tensor(x, dtype=torch.int64).to(device)

        if p.repetition_penalty != 1.0:
            if self.seen is None:
                self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
                self.seen[ids(prompt_ids)] = True
            if new:
                self.seen[ids(new)] = True
        if p.presence_penalty or p.frequency_penalty:
            if self.counts is None:
                self.counts = torch.zeros(vocab, dtype=torch.float32, device=device)
                new = output_ids
            if new:
                self.counts.index_add_(0, ids(new), torch.ones(len(new), device=device))
        self.num_folded = len(output_ids)


@dataclass
class SampleRow:
    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]
    state: RequestSampler = field(default_factory=RequestSampler)


@dataclass
class Sampled:
    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)


def _column(rows: list[SampleRow], get, device: torch.device, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor([get(r.params) for r in rows], dtype=dtype).to(device)[:, None]  # [n, 1]


def apply_penalties(logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    """logits: [n, V] fp32 of rows that all need penalties (modified in place and returned)."""
    vocab, dev = logits.shape[1], logits.device
    for r in rows:
        r.state.fold(r.params, r.prompt_ids, r.output_ids, vocab, dev)
    rep = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0]
    if rep:
        sel = logits[rep]
        rp = _column([rows[i] for i in rep], lambda p: p.repetition_penalty, dev)
        seen = torch.stack([rows[i].state.seen for i in rep])
        logits[rep] = torch.where(seen, torch.where(sel > 0, sel / rp, sel * rp), sel)
    pf = [i for i, r in enumerate(rows) if r.params.presence_penalty or r.params.frequency_penalty]
    if pf:
        counts = torch.stack([rows[i].state.counts for i in pf])
        freq = _column([rows[i] for i in pf], lambda p: p.frequency_penalty, dev)
        pres = _column([rows[i] for i in pf], lambda p: p.presence_penalty, dev)
        logits[pf] = logits[pf] - (freq * counts + pres * (counts > 0).float())
    return logits


def filter_logits(logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    """Mask what top-k, then min-p and top-p (on the top-k distribution) exclude, with -inf.
    logits: [n, V] fp32, already divided by each row's temperature."""
    n, vocab = logits.shape
    dev = logits.device
    ks = [r.params.top_k if 0 < r.params.top_k < vocab else 0 for r in rows]  # decisions from Python values:
    if any(ks):  # no device sync
        top_k = torch.tensor(ks).to(dev)
        values = torch.topk(logits, max(ks), dim=-1).values  # [n, k_max], descending
        kth = values.gather(1, (top_k.clamp(min=1) - 1)[:, None])
        kth = torch.where(top_k[:, None] > 0, kth, float("-inf"))
        logits = logits.masked_fill(logits < kth, float("-inf"))
    top_p = _column(rows, lambda p: p.top_p, dev)
    min_p = _column(rows, lambda p: p.min_p, dev)
    nucleus = [i for i, r in enumerate(rows) if r.params.top_p < 1.0]
    if nucleus or any(r.params.min_p > 0 for r in rows):
        probs = torch.softmax(logits, dim=-1)
        drop = probs < min_p * probs.max(dim=-1, keepdim=True).values
        if nucleus:
            sorted_probs, order = torch.sort(probs[nucleus], dim=-1, descending=True)
            drop_sorted = (torch.cumsum(sorted_probs, -1) - sorted_probs) > top_p[nucleus]
            drop[nucleus] |= torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _draw(logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    """Random rows: temperature, filters, then inverse-CDF sampling, one uniform number per row against the running
    sum of its probabilities. An exponential race (one random number per vocabulary entry, what
    ``torch.multinomial`` does too) costs ~27 ms a step at 32 rows x 49k tokens on 2 cores
    (``benchmarks/cpu_kernels.py sample``). The running sum is fp32 (an fp64 one cost 5.6 ms of the step): its
    rounding moves probability of ~1e-7 between neighbouring tokens. Token ids [n] int64; a token of probability 0
    is never drawn (its running sum does not grow)."""
    if any(r.params.temperature != 1.0 for r in rows):
        logits = logits / _column(rows, lambda p: p.temperature, logits.device)
    logits = filter_logits(logits, rows)
    probs = torch.softmax(logits, dim=-1)
    cdf = probs.cumsum(dim=-1)  # [n, V]
    u = torch.rand(len(rows), 1, device=probs.device)
    for i, r in enumerate(rows):  # seeded requests draw from their own stream (vLLM does the same)
        if r.state.generator is not None:
            g = r.state.generator
            u[i] = torch.rand(1, generator=g, device=g.device).to(probs.device)
    # the first token whose running sum passes u·total (right=True skips tokens of probability 0); u·total is kept
    # strictly below the total, which fp32 rounding could otherwise reach
    total = cdf[:, -1:]
    target = torch.minimum(u.mul_(total), torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(1)


@torch.inference_mode()
def sample(logits: torch.Tensor, rows: list[SampleRow]) -> list[Sampled]:
    """logits: [N, V] fp32, one row per request (modified in place) -> one Sampled per row."""
    params = [r.params for r in rows]
    logprob_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    raw_logprobs = torch.log_softmax(logits[logprob_rows], dim=-1) if logprob_rows else None  # before penalties
    penalised = [i for i, p in enumerate(params) if p.needs_penalties]
    if penalised:
        logits[penalised] = apply_penalties(logits[penalised], [rows[i] for i in penalised])
    drawn = [i for i, p in enumerate(params) if not p.greedy]
    if len(drawn) == len(rows):  # no greedy row: no argmax, no copy of the rows
        tokens = _draw(logits, rows)
    else:
        tokens = logits.argmax(dim=-1)  # greedy rows (and a placeholder for the others)
        if drawn:
            tokens[drawn] = _draw(logits[drawn], [rows[i] for i in drawn])
    token_ids = tokens.tolist()
    out = [Sampled(t) for t in token_ids]
    if raw_logprobs is not None:
        chosen = raw_logprobs.gather(1, tokens[logprob_rows][:, None])[:, 0].tolist()
        k_max = max(params[i].logprobs for i in logprob_rows)
        top = torch.topk(raw_logprobs, k_max, dim=-1) if k_max else None
        top_ids, top_vals = (top.indices.tolist(), top.values.tolist()) if top is not None else ([], [])
        for j, i in enumerate(logprob_rows):
            out[i].logprob = chosen[j]
            k = params[i].logprobs
            if k:
                out[i].top_logprobs = list(zip(top_ids[j][:k], top_vals[j][:k]))
    return out
