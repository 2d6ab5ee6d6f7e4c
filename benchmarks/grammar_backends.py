"""llguidance against xgrammar on this machine: grammar compile time and the per-token cost of the
next-token mask, for the schemas, regexes and grammars of the structured-output tests, with SmolLM2's
tokenizer (the one ``dummy:tiny`` and ``smollm2`` use).

Token sequences come from random walks through each grammar (a uniformly random allowed token at every
step, seeded), the way a random-weights model decodes under a mask; both libraries replay the same
sequences: at every step, fill the next-token bitmask, then accept the token. Batch 32 fills the masks of
32 matchers (32 different walks) in one call per step: ``LLExecutor`` for llguidance,
``BatchGrammarMatcher`` for xgrammar, each with 2 threads.

xgrammar is not a csps dependency (its wheel requires triton); to include it, install it aside:

    pip install --no-deps --target /tmp/xgr xgrammar apache-tvm-ffi
    PYTHONPATH=/tmp/xgr .venv/bin/python benchmarks/grammar_backends.py     # writes results/grammar_backends.json
"""

from __future__ import annotations

import json
import os
import random
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from common import median, save, table  # noqa: E402
from structured_cases import CHOICES, GBNF_WORD, LARK_SUM, REGEXES, SCHEMAS  # noqa: E402

VOCAB = 49152
EOS = 2
WALK_TOKENS = 64
BATCH = 32
THREADS = 2


def cases() -> dict[str, tuple[str, str]]:
    out = {f"json_schema:{k}": ("json_schema", json.dumps(v)) for k, v in SCHEMAS.items()}
    out["json_object"] = ("json_schema", json.dumps({"type": "object"}))
    out.update({f"regex:{k}": ("regex", v) for k, v in REGEXES.items()})
    out["choice"] = ("choice", json.dumps(CHOICES))
    out["lark:sum"] = ("lark", LARK_SUM)
    out["gbnf:word"] = ("gbnf", GBNF_WORD)
    return out


class LLG:
    name = "llguidance"

    def __init__(self, hf) -> None:
        import llguidance
        import llguidance.hf

        self.llg = llguidance
        t0 = time.perf_counter()
        self.tok = llguidance.hf.from_tokenizer(hf, n_vocab=VOCAB, eos_token=EOS)
        self.setup_s = time.perf_counter() - t0
        self.executor = llguidance.LLExecutor(num_threads=THREADS)
        self.words = (VOCAB + 31) // 32

    def grammar(self, kind: str, text: str) -> str:
        return self.llg.grammar_from("grammar" if kind in ("lark", "gbnf") else kind, text)

    def compile(self, kind: str, text: str):
        m = self.llg.LLMatcher(self.tok, self.grammar(kind, text), log_level=0)
        assert not m.is_error(), m.get_error()
        return m

    def fresh(self, compiled):
        return compiled.deep_copy()

    def fill(self, matchers, mask: np.ndarray) -> None:
        self.executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)], mask.ctypes.data,
                                              self.words * 4, mask.shape[0])

    def accept(self, m, token: int) -> bool:
        return m.consume_token(token)


class XGR:
    name = "xgrammar"

    def __init__(self, hf) -> None:
        import xgrammar

        self.xgr = xgrammar
        t0 = time.perf_counter()
        info = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=VOCAB, stop_token_ids=[EOS])
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=THREADS, cache_enabled=False)
        self.setup_s = time.perf_counter() - t0
        self.batch = xgrammar.BatchGrammarMatcher(max_threads=THREADS)

    def compile(self, kind: str, text: str):
        c = self.compiler
        if kind == "json_schema":
            return c.compile_json_schema(text)
        if kind == "regex":
            return c.compile_regex(text)
        if kind == "choice":
            return c.compile_grammar("root ::= " + " | ".join(json.dumps(x) for x in json.loads(text)))
        if kind == "lark":
            return c.compile_lark(text)
        return c.compile_grammar(text)

    def fresh(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matchers, mask: np.ndarray) -> None:
        if len(matchers) == 1:
            matchers[0].fill_next_token_bitmask(mask)
        else:
            self.batch.batch_fill_next_token_bitmask(matchers, mask)

    def accept(self, m, token: int) -> bool:
        return m.accept_token(token)


def allowed(mask_row: np.ndarray) -> np.ndarray:
    return np.flatnonzero(np.unpackbits(mask_row.view(np.uint8), bitorder="little")[:VOCAB])


def random_walk(lib: LLG, compiled, seed: int) -> list[int]:
    rng = random.Random(seed)
    m = lib.fresh(compiled)
    mask = np.zeros((1, lib.words), dtype=np.int32)
    tokens = []
    while len(tokens) < WALK_TOKENS and not m.is_stopped():
        lib.fill([m], mask)
        ok = allowed(mask[0])
        t = int(ok[rng.randrange(len(ok))])
        if t == EOS:
            break
        assert m.consume_token(t)
        tokens.append(t)
    return tokens


def replay(lib, compiled, walks: list[list[int]]) -> dict:
    """Seconds per step (fill the masks of len(walks) matchers, accept one token each)."""
    matchers = [lib.fresh(compiled) for _ in walks]
    mask = np.zeros((len(walks), (VOCAB + 31) // 32), dtype=np.int32)
    steps, rejected = [], 0
    for i in range(max(len(w) for w in walks)):
        live = [(m, w[i]) for m, w in zip(matchers, walks) if i < len(w)]
        t0 = time.perf_counter()
        lib.fill([m for m, _ in live], mask[: len(live)])
        for m, t in live:
            rejected += not lib.accept(m, t)
        steps.append(time.perf_counter() - t0)
    return {"step_s": median(steps), "mean_step_s": sum(steps) / len(steps), "first_step_s": steps[0],
            "steps": len(steps), "rejected": rejected}


def main() -> None:
    from csps.bench.run import busy_cores_of_others
    from csps.engine.tokenizer import load_tokenizer

    others = busy_cores_of_others()
    print(f"load average {os.getloadavg()[0]:.2f}, other processes busy on {others:.2f} cores")

    hf = load_tokenizer("smollm2")
    libs = [LLG(hf)]
    try:
        libs.append(XGR(hf))
    except ImportError:
        print("xgrammar is not installed: measuring llguidance only (see this script's docstring)")
    walker = libs[0]
    results: dict = {lib.name: {"tokenizer_setup_s": lib.setup_s, "cases": {}} for lib in libs}
    rows = []
    for name, (kind, text) in cases().items():
        base = walker.compile(kind, text)
        walks = [random_walk(walker, base, seed) for seed in range(BATCH)]
        row = [name, f"{sum(map(len, walks)) / len(walks):.0f}"]
        for lib in libs:
            compile_s = []
            for _ in range(5):
                t0 = time.perf_counter()
                compiled = lib.compile(kind, text)
                compile_s.append(time.perf_counter() - t0)
            b1 = replay(lib, compiled, walks[:1])
            b32 = replay(lib, compiled, walks)
            results[lib.name]["cases"][name] = {"compile_s": median(compile_s), "batch1": b1, "batch32": b32}
            row += [f"{median(compile_s) * 1e3:.1f}", f"{b1['step_s'] * 1e6:.0f} / {b1['mean_step_s'] * 1e6:.0f}",
                    f"{b32['step_s'] * 1e6:.0f} / {b32['mean_step_s'] * 1e6:.0f}"]
            if b1["rejected"] or b32["rejected"]:
                row[-1] += f" ({b1['rejected'] + b32['rejected']} rejected)"
        rows.append(row)
    header = ["case", "walk tokens"]
    for lib in libs:
        header += [f"{lib.name} compile ms", f"{lib.name} µs/step b1 (median / mean)",
                   f"{lib.name} µs/step b32 (median / mean)"]
    print(table(rows, tuple(header)))
    print("tokenizer setup: " + ", ".join(f"{lib.name} {lib.setup_s:.2f} s" for lib in libs))
    print(save("grammar_backends", {"others_busy_cores_before": others, "vocab": VOCAB, "threads": THREADS, "walk_tokens": WALK_TOKENS,
                                    "results": results, "table": rows, "header": header}))


if __name__ == "__main__":
    main()
