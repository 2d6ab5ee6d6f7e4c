"""The per-step cost of constrained decoding, and the compile time of the test schemas.

For each model (``dummy:tiny``, then ``smollm2``) and batch size (1, 32): B requests decode T tokens
each, unconstrained or with a JSON schema, alternating ``--repeats`` times in one process (same machine
load for both columns). The schema is an array of at least 1,000 PERSON objects (tests/structured_cases.py),
so no request finishes early and every step masks every row, over objects, strings, integers, booleans
and enums. A step's time is the engine's own (``Engine.step_log``: schedule, forward, mask, sample);
only decode steps with all B requests count; medians. Also the CPU time of this process per step of each run
(``time.process_time``, all its threads), which time spent waiting for a core does not inflate.

On a shared machine the two medians move with the other jobs' load by more than the grammar costs, so the
grammar's own work per step is also timed directly, in the same process: the engine's ``StructuredDecoding``
masks B rows of random logits ``[B, V]`` (one ``apply``) and advances B matchers by the argmax tokens (B
``consume``; the argmax, the sampler's part, is not timed), ``--direct-steps`` times; overhead = that median over the median unconstrained step.

Compile times: each spec of the tests, compiled cold by a fresh ``GrammarCompiler`` (its tokenizer built
first, timed apart), then fetched from the cache.

    .venv/bin/python benchmarks/structured_outputs.py            # writes results/structured_outputs.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from common import median, save, table  # noqa: E402
from structured_cases import CHOICES, GRAMMARS, PERSON, REGEXES, SCHEMAS, TIME_TOOL, WEATHER_TOOL  # noqa: E402

from csps import LLM, SamplingParams  # noqa: E402
from csps.core.structured_outputs import StructuredOutputs  # noqa: E402

STEADY = StructuredOutputs.json_schema({"type": "array", "items": PERSON, "minItems": 1000})


def test_specs() -> dict[str, StructuredOutputs]:
    specs = {f"json_schema:{k}": StructuredOutputs.json_schema(v) for k, v in SCHEMAS.items()}
    specs["json_object"] = StructuredOutputs.json_object()
    specs.update({f"regex:{k}": StructuredOutputs("regex", v) for k, v in REGEXES.items()})
    specs["choice"] = StructuredOutputs.choice(CHOICES)
    specs.update({f"grammar:{k}": StructuredOutputs("grammar", v) for k, v in GRAMMARS.items()})
    from csps.server.structured_api import Tool, tools_spec  # the grammar of tool_choice 'required'

    specs["tools_required"] = StructuredOutputs(**tools_spec([Tool(**WEATHER_TOOL), Tool(**TIME_TOOL)], "required", None))
    return specs


def decode_steps(llm: LLM, batch: int, tokens: int, so: StructuredOutputs | None, seed: int) -> tuple[list[float], float]:
    """(wall seconds of each decode step with all B requests, CPU seconds of this process per step of the run)."""
    params = [SamplingParams(max_tokens=tokens, temperature=1.0, seed=seed + i, ignore_eos=True,
                             structured_outputs=so) for i in range(batch)]
    llm.engine.step_log.clear()
    cpu0 = time.process_time()
    outs = llm.generate(["Write the records as JSON."] * batch, params, use_tqdm=False)
    cpu = (time.process_time() - cpu0) / len(llm.engine.step_log)
    assert all(len(o.token_ids) == tokens for o in outs), "a request ended early: the step batch would shrink"
    if so is not None:
        for o in outs:
            assert o.text.startswith("[{"), o.text[:40]
    return [r.duration_s for r in llm.engine.step_log if r.num_decode_tokens == batch and r.num_prefill_tokens == 0], cpu


def grammar_work(llm: LLM, batch: int, steps: int) -> float:
    """Median seconds of one step's grammar work (mask B rows, advance B matchers) in the engine's own
    StructuredDecoding, over random logits."""
    import torch

    sd, vocab = llm.engine.structured, llm.engine.model_config.vocab_size
    ids = [f"direct-{i}" for i in range(batch)]
    for r in ids:
        sd.attach(r, STEADY)
    g, times = torch.Generator().manual_seed(0), []
    for _ in range(steps):
        logits = torch.randn(batch, vocab, generator=g)
        t0 = time.perf_counter()
        sd.apply(logits, ids)
        t1 = time.perf_counter()
        tokens = logits.argmax(1).tolist()  # the sampler's part, not timed
        t2 = time.perf_counter()
        for r, t in zip(ids, tokens):
            assert not sd.consume(r, t), "the steady grammar never completes"
        times.append(t1 - t0 + time.perf_counter() - t2)
    for r in ids:
        sd.drop(r)
    return median(times)


def bench_model(model: str, batches: list[int], tokens: int, repeats: int, direct_steps: int) -> dict:
    llm = LLM(model, max_model_len=2048, seed=0)
    llm.engine.structured.compiler.compile(STEADY)  # compiled once, as a server's cache would have it
    out = {}
    for b in batches:
        decode_steps(llm, b, tokens, None, 0)  # warm-up, not counted: the first use of KV blocks (page faults)
        decode_steps(llm, b, tokens, STEADY, 0)  # and of the grammar's lexer states
        free, constrained, free_cpu, constrained_cpu = [], [], [], []
        for r in range(repeats):
            for steps, cpus, so in ((free, free_cpu, None), (constrained, constrained_cpu, STEADY)):
                wall, cpu = decode_steps(llm, b, tokens, so, 100 * r)
                steps += wall
                cpus.append(cpu)
        work = grammar_work(llm, b, direct_steps)
        out[b] = {"free_step_s": median(free), "constrained_step_s": median(constrained),
                  "overhead": median(constrained) / median(free) - 1, "steps": [len(free), len(constrained)],
                  "free_cpu_s": median(free_cpu), "constrained_cpu_s": median(constrained_cpu),
                  "cpu_overhead": median(constrained_cpu) / median(free_cpu) - 1,
                  "grammar_work_s": work, "direct_overhead": work / median(free)}
        print(f"{model} batch {b}: wall free {out[b]['free_step_s'] * 1e3:.2f} ms, constrained "
              f"{out[b]['constrained_step_s'] * 1e3:.2f} ms ({out[b]['overhead']:+.1%}); CPU "
              f"{out[b]['free_cpu_s'] * 1e3:.2f} / {out[b]['constrained_cpu_s'] * 1e3:.2f} ms "
              f"({out[b]['cpu_overhead']:+.1%}); grammar work {work * 1e3:.3f} ms/step ({out[b]['direct_overhead']:+.1%})",
              flush=True)
    llm.shutdown()
    return out


def compile_times() -> dict:
    from csps.engine.grammar import GrammarCompiler
    from csps.engine.tokenizer import load_tokenizer

    compiler = GrammarCompiler(load_tokenizer("smollm2"), 49152, {2})
    t0 = time.perf_counter()
    compiler.tokenizer  # noqa: B018 - built once per engine
    out = {"tokenizer_s": time.perf_counter() - t0, "specs": {}}
    for name, so in test_specs().items():
        t0 = time.perf_counter()
        compiler.compile(so)
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        compiler.compile(so)
        out["specs"][name] = {"cold_s": cold, "cached_s": time.perf_counter() - t0, "chars": len(so.spec)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["dummy:tiny", "smollm2"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    ap.add_argument("--tokens", type=int, default=16, help="decode steps per request and run")
    ap.add_argument("--repeats", type=int, default=8, help="alternations of free and constrained runs")
    ap.add_argument("--direct-steps", type=int, default=200, help="steps of the direct timing of the grammar work")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                    help="first wait up to this long for other jobs to leave the CPU")
    a = ap.parse_args()
    from csps.bench.run import busy_cores_of_others, wait_for_quiet

    waited = wait_for_quiet(a.wait_quiet) if a.wait_quiet else 0.0
    load, others = os.getloadavg()[0], busy_cores_of_others()
    print(f"load average {load:.2f}, other processes busy on {others:.2f} cores (waited {waited:.0f} s)")
    comp = compile_times()
    rows = [(name, v["chars"], f"{v['cold_s'] * 1e3:.2f}", f"{v['cached_s'] * 1e6:.0f}") for name, v in comp["specs"].items()]
    print(table(rows, ("spec", "characters", "compile ms (cold)", "cached µs")))
    print(f"grammar tokenizer (once per engine): {comp['tokenizer_s']:.2f} s")
    steps = {m: bench_model(m, a.batches, a.tokens, a.repeats, a.direct_steps) for m in a.models}
    step_rows = [(m, b, f"{v['free_step_s'] * 1e3:.2f} / {v['constrained_step_s'] * 1e3:.2f}", f"{v['overhead']:+.1%}",
                  f"{v['free_cpu_s'] * 1e3:.2f} / {v['constrained_cpu_s'] * 1e3:.2f}", f"{v['cpu_overhead']:+.1%}",
                  f"{v['grammar_work_s'] * 1e3:.3f}", f"{v['direct_overhead']:+.1%}")
                 for m, per in steps.items() for b, v in per.items()]
    print(table(step_rows, ("model", "batch", "wall ms/step free / constrained", "wall", "CPU ms/step free / constrained",
                            "CPU", "grammar work ms/step", "work / free step")))
    print(f"other processes busy on {busy_cores_of_others():.2f} cores at the end")
    print(save("structured_outputs", {"direct_steps": a.direct_steps, "load_before": load, "others_busy_cores_before": others,
                                      "others_busy_cores_after": busy_cores_of_others(), "tokens": a.tokens, "repeats": a.repeats,
                                      "steady_spec": json.loads(STEADY.spec), "compile": comp, "steps": steps}))


if __name__ == "__main__":
    main()
