"""Structured outputs in the engine: each constrained request's grammar state, and the token masks.

Only the sampling rank (rank 0, which owns the ``Engine``) holds matchers, at every SP × TP layout. Per step:
``apply`` computes the next-token bitmask of every constrained row and masks those rows of the ``[N, V]`` logits with one ``masked_fill``, before the sampler runs, so
greedy and sampled decoding, penalties and logprobs all see only the allowed tokens; EOS is allowed only
where the grammar accepts. ``consume`` advances a matcher with its sampled token and says when the
grammar is complete (the request must stop). A request's matcher is dropped when it finishes or is
aborted; a preempted request keeps it (its output tokens are kept and recomputed, so the matcher, which
has consumed exactly those tokens, stays consistent).

The masks are computed one row after the other on the engine's thread (a few µs to ~0.2 ms a row), not on
llguidance's thread pool: its threads spin after each batch, and on a machine whose cores torch's own threads
use, torch's next parallel op then waited for a core, ~15 ms a step here (benchmarks/README.md).
"""

from __future__ import annotations

import logging

import llguidance
import numpy as np
import torch

from csps.core.structured_outputs import StructuredOutputs
from csps.engine.grammar import GrammarCompiler
from csps.errors import RequestError

log = logging.getLogger("csps.structured")


class StructuredDecoding:
    def __init__(self, tokenizer, vocab_size: int, eos_ids) -> None:
        """``tokenizer``: the engine's ``csps.engine.tokenizer.Tokenizer`` (None: token ids only, no grammars);
        ``vocab_size``: the width of the logits."""
        self.hf_tokenizer = tokenizer.hf if tokenizer is not None else None
        self.vocab_size = vocab_size
        self.eos_ids = sorted(eos_ids)
        self.matchers: dict[str, llguidance.LLMatcher] = {}
        self._compiler: GrammarCompiler | None = None
        self._mask = np.zeros((0, 0), dtype=np.int32)

    @property
    def compiler(self) -> GrammarCompiler:
        if self._compiler is None:
            if self.hf_tokenizer is None:
                raise RequestError("structured outputs need the model's tokenizer, and this engine has none")
            self._compiler = GrammarCompiler(self.hf_tokenizer, self.vocab_size, self.eos_ids)
        return self._compiler

    # -- requests --------------------------------------------------------------------------
    def attach(self, req_id: str, so: StructuredOutputs) -> None:
        """Give a request its grammar (compiled now unless cached: the server compiles it beforehand)."""
        self.matchers[req_id] = self.compiler.compile(so).matcher()

    def drop(self, req_id: str) -> None:
        self.matchers.pop(req_id, None)

    def __contains__(self, req_id: str) -> bool:
        return req_id in self.matchers

    # -- the step --------------------------------------------------------------------------
    def apply(self, logits: torch.Tensor, req_ids: list[str]) -> None:
        """Mask, in place, the rows of ``logits`` [N, V] (row i samples ``req_ids[i]``) that have a grammar."""
        if not self.matchers:
            return
        rows = [(i, self.matchers[r]) for i, r in enumerate(req_ids) if r in self.matchers]
        if not rows:
            return
        words = self.compiler.mask_words
        if self._mask.shape[0] < len(rows) or self._mask.shape[1] != words:
            self._mask = np.zeros((max(len(rows), 2 * self._mask.shape[0]), words), dtype=np.int32)
        mask = self._mask[: len(rows)]
        for j, (_, m) in enumerate(rows):  # on this thread: see the module's docstring
            m.unsafe_compute_mask_ptr(mask[j].ctypes.data, words * 4)
        width = logits.shape[1]
        dead = ~mask.any(axis=1) if width >= self.compiler.vocab_size else None
        # 1 where a token is NOT allowed: unpack the inverted words, then view those 0/1 bytes as bools (no copy)
        blocked = np.unpackbits(np.invert(mask).view(np.uint8), axis=1, count=width, bitorder="little")
        if dead is None:  # the tokenizer is wider than the logits: look at the bits that are sampled from
            dead = blocked.all(axis=1)
        if dead.any():  # a matcher in an error state allows nothing: let the request end (EOS) instead of NaNs
            for j in np.flatnonzero(dead).tolist():
                log.warning("grammar of request %s is stuck (%s); stopping it", req_ids[rows[j][0]],
                            rows[j][1].get_error() or "no token allowed")
                blocked[j, self.eos_ids[0] if self.eos_ids else 0] = 0
        with torch.inference_mode():  # the logits are an inference tensor: updated in place only in this mode
            blocked_t = torch.from_numpy(blocked).view(torch.bool)
            if len(rows) == logits.shape[0]:
                logits.masked_fill_(blocked_t, float("-inf"))
            else:
                index = torch.tensor([i for i, _ in rows])
                logits[index] = logits[index].masked_fill(blocked_t, float("-inf"))

    def consume(self, req_id: str, token_id: int) -> bool:
        """Advance the request's matcher by its sampled token; True when the grammar is complete (nothing but
        EOS may follow, or the matcher failed), so the request must stop."""
        m = self.matchers.get(req_id)
        if m is None:
            return False
        if not m.consume_token(token_id) and token_id not in self.eos_ids:
            log.warning("grammar of request %s rejected token %d: %s", req_id, token_id, m.get_error())
        return m.is_stopped()
