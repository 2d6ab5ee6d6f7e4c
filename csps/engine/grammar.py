"""Compiling structured-output specs into llguidance matchers: once per distinct spec, cached, bounded.

A compiled grammar is a fresh ``llguidance.LLMatcher`` whose first token mask has already been computed
(llguidance builds its lexer lazily; doing it here moves that cost, and any late error, out of the
engine's step). Each request gets a ``deep_copy`` of it (~20 µs), which shares the built lexer.

``GrammarCompiler.compile`` is thread-safe and may run on worker threads while the engine steps (the
server does so, ``csps.server.grammar_jobs``): llguidance drops the GIL while it builds a matcher.
Errors in the spec (an invalid schema, an unsupported keyword, a regex or grammar that does not parse,
a grammar over llguidance's size limits) raise ``GrammarError`` naming the request field and the problem.

Why llguidance rather than xgrammar: ``benchmarks/README.md`` (structured outputs).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict

import llguidance
import numpy as np

from csps.core.structured_outputs import StructuredOutputs
from csps.errors import RequestError

log = logging.getLogger("csps.grammar")

# JSON is generated the way Python's json.dumps writes it: '{"a": 1, "b": [2, 3]}'. No free whitespace:
# with it a model (a random one surely) can emit whitespace tokens without end, and the output stays parseable
# either way.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# llguidance's bounds on one grammar (its defaults, written out so the README can state them): at most
# 500,000 symbols, 250,000 lexer states, and per token at most 200,000 units of lexer work and 50,000
# Earley items (a step that needs more stops the request).
LIMITS = dict(max_grammar_size=500_000, max_lexer_states=250_000, initial_lexer_fuel=1_000_000,
              step_lexer_fuel=200_000, step_max_items=50_000, max_items_in_row=2000)
CACHE_SIZE = 256  # compiled grammars kept (least recently used dropped first)
MAX_ERROR_CHARS = 600

WHAT = {"json_schema": "invalid or unsupported JSON schema", "regex": "the regex does not compile",
        "choice": "invalid choice list", "grammar": "the grammar does not compile"}


class GrammarError(RequestError):
    """A spec that cannot be compiled; the message names the request field and the problem."""


def error_for(so: StructuredOutputs, detail: str) -> GrammarError:
    detail = detail.split("<backtrace>")[0]
    if detail.startswith("panic:"):  # an internal limit of llguidance (e.g. 65,000 grammar symbols)
        detail = "it is too large or too complex to compile (" + detail.removeprefix("panic:").strip() + ")"
    detail = " ".join(detail.split())  # llguidance's messages span lines (a caret under the spot)
    if len(detail) > MAX_ERROR_CHARS:
        detail = detail[: MAX_ERROR_CHARS - 3] + "..."
    where = f"{so.param}: " if so.param else ""
    return GrammarError(f"{where}{WHAT[so.kind]}: {detail}", so.param)


def grammar_text(so: StructuredOutputs) -> str:
    """The llguidance grammar of a spec (not yet checked: the matcher does that)."""
    try:
        if so.kind == "json_schema":
            return llguidance.LLMatcher.grammar_from_json_schema(so.spec, overrides=JSON_OPTIONS)
        if so.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(so.spec)
        if so.kind == "choice":
            return llguidance.grammar_from("choice", so.spec)
        return llguidance.grammar_from("grammar", so.spec)  # Lark, or GBNF converted to Lark
    except (ValueError, TypeError) as e:
        raise error_for(so, str(e)) from None


class CompiledGrammar:
    def __init__(self, template: llguidance.LLMatcher, compile_s: float) -> None:
        self.template = template  # never advanced: only copied
        self.compile_s = compile_s

    def matcher(self) -> llguidance.LLMatcher:
        return self.template.deep_copy()


class GrammarCompiler:
    """Compiles specs for one tokenizer and vocabulary (the logits' width, which may exceed the tokenizer's)."""

    def __init__(self, hf_tokenizer, vocab_size: int, eos_ids, cache_size: int = CACHE_SIZE) -> None:
        self.hf_tokenizer = hf_tokenizer
        self.vocab_size = max(vocab_size, len(hf_tokenizer))
        self.eos_ids = sorted(eos_ids)
        self.cache_size = cache_size
        self.cache: OrderedDict[tuple[str, str], CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()
        self._tokenizer: llguidance.LLTokenizer | None = None
        self.limits = llguidance.LLParserLimits(**LIMITS, verbose_errors=False)

    @property
    def mask_words(self) -> int:
        """int32 words of one token bitmask."""
        return (self.vocab_size + 31) // 32

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        """llguidance's view of the tokenizer (built once, ~1 s: its token trie)."""
        with self._lock:
            if self._tokenizer is None:
                import llguidance.hf  # imports transformers: only in the engine process

                t0 = time.perf_counter()
                self._tokenizer = llguidance.hf.from_tokenizer(self.hf_tokenizer, n_vocab=self.vocab_size,
                                                               eos_token=self.eos_ids or None)
                log.info("grammar tokenizer ready in %.2f s (vocabulary %d)", time.perf_counter() - t0,
                         self.vocab_size)
            return self._tokenizer

    def cached(self, so: StructuredOutputs) -> CompiledGrammar | None:
        with self._lock:
            hit = self.cache.get(so.key)
            if hit is not None:
                self.cache.move_to_end(so.key)
            return hit

    def compile(self, so: StructuredOutputs) -> CompiledGrammar:
        hit = self.cached(so)
        if hit is not None:
            return hit
        t0 = time.perf_counter()
        matcher = llguidance.LLMatcher(self.tokenizer, grammar_text(so), log_level=0, limits=self.limits)
        if not matcher.is_error():  # build the lexer and the first mask now, off the engine's step
            scratch = np.zeros(self.mask_words, dtype=np.int32)
            matcher.unsafe_compute_mask_ptr(scratch.ctypes.data, scratch.nbytes)
        if matcher.is_error():
            raise error_for(so, matcher.get_error())
        compiled = CompiledGrammar(matcher, time.perf_counter() - t0)
        with self._lock:
            self.cache[so.key] = compiled
            while len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)
        log.debug("compiled a %s grammar (%d characters) in %.1f ms", so.kind, len(so.spec), compiled.compile_s * 1e3)
        return compiled
