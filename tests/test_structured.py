"""Structured outputs in the engine: compiling specs (errors, cache), the batched token mask, and offline
generation on a random-weight model, where only the grammar can make the output valid."""

import json
import re

import jsonschema
import pytest
import torch
from structured_cases import CHOICES, GBNF_WORD, LARK_SUM, NESTED, PERSON, REGEX_CODE, REGEX_EMAIL

from csps import LLM, SamplingParams
from csps.core.structured_outputs import MAX_SPEC_CHARS, StructuredOutputs
from csps.engine.grammar import GrammarCompiler, GrammarError
from csps.engine.structured import StructuredDecoding
from csps.errors import RequestError

EOS = 2
VOCAB = 49152


@pytest.fixture(scope="module")
def compiler(smollm2_tokenizer):
    return GrammarCompiler(smollm2_tokenizer.hf, VOCAB, {EOS})


@pytest.fixture(scope="module")
def llm():
    return LLM("dummy:tiny", dtype="float32", token_budget=64, num_blocks=256, seed=0, max_model_len=2048)


def schema(s, param="response_format.json_schema.schema"):
    return StructuredOutputs.json_schema(s, param)


# -- compiling ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("so,needle", [
    (schema({"type": "strin"}), "Invalid type: strin"),
    (schema({"type": "object", "properties": 5}), "properties must be an object"),
    (schema({"type": "array", "uniqueItems": True}), "uniqueItems"),
    (schema({"type": "string", "format": "bogus"}), "Unknown format: bogus"),
    (schema({"$ref": "#/$defs/missing"}), "/$defs/missing"),
    (StructuredOutputs("regex", "((", "structured_outputs.regex"), "unclosed group"),
    (StructuredOutputs("grammar", "start: undefined_rule", "structured_outputs.grammar"), "undefined_rule"),
    (StructuredOutputs("grammar", 'root ::= ("a" | "b"', "structured_outputs.grammar"), "Expected ')'"),
])
def test_bad_specs_name_the_field_and_the_problem(compiler, so, needle):
    with pytest.raises(GrammarError) as e:
        compiler.compile(so)
    msg = str(e.value)
    assert msg.startswith(so.param + ": ") and needle in msg and "\n" not in msg
    assert e.value.param == so.param


def test_spec_shapes_are_checked_before_compiling():
    with pytest.raises(RequestError, match="not valid JSON"):
        StructuredOutputs.json_schema("{nope", "x")
    with pytest.raises(RequestError, match="must be an object or a boolean"):
        StructuredOutputs.json_schema([1, 2], "x")
    with pytest.raises(RequestError, match="non-empty list of non-empty strings"):
        StructuredOutputs.choice(["a", ""], "x")
    with pytest.raises(RequestError, match="must not be empty"):
        StructuredOutputs("regex", "  ", "x")
    with pytest.raises(RequestError, match=f"at most {MAX_SPEC_CHARS:,}"):
        StructuredOutputs("regex", "a" * (MAX_SPEC_CHARS + 1), "x")
    # what crosses the process boundary (a dict) comes back as the same spec
    p = SamplingParams(structured_outputs={"kind": "regex", "spec": "[a-z]+", "param": "x"})
    assert p.structured_outputs == StructuredOutputs("regex", "[a-z]+", "x")


def test_compiled_once_per_spec(compiler):
    a = compiler.compile(schema(PERSON))
    b = compiler.compile(schema(json.loads(json.dumps(PERSON)), param="structured_outputs.json"))
    assert a is b  # same spec, another field: one grammar
    c = compiler.compile(schema(NESTED))
    assert c is not a and a.compile_s > 0
    assert a.matcher() is not a.matcher()  # each request its own state


# -- the mask ----------------------------------------------------------------------------------------
def allowed_ids(row: torch.Tensor) -> set[int]:
    return set(torch.isfinite(row).nonzero().flatten().tolist())


def test_mask_applies_only_to_constrained_rows_and_allows_eos_only_when_accepting(smollm2_tokenizer):
    sd = StructuredDecoding(smollm2_tokenizer, VOCAB + 64, {EOS})  # logits wider than the tokenizer
    sd.attach("digits", StructuredOutputs("regex", r"[0-9]{1,2}"))
    sd.attach("choice", StructuredOutputs.choice(["yes", "no"]))
    logits = torch.randn(3, VOCAB + 64)
    plain = logits[1].clone()
    sd.apply(logits, ["digits", "free", "choice"])
    assert torch.equal(logits[1], plain)  # the unconstrained row is untouched
    tok = smollm2_tokenizer
    digits = allowed_ids(logits[0])
    assert digits and all(re.fullmatch(r"[0-9]{1,2}", tok.decode([t])) for t in digits)
    assert EOS not in digits and not any(t >= VOCAB for t in digits)
    assert {tok.decode([t]) for t in allowed_ids(logits[2])} <= {"y", "ye", "yes", "n", "no"}
    # after one digit the regex accepts: EOS becomes allowed; after two it is complete
    one = next(t for t in digits if len(tok.decode([t])) == 1)
    assert sd.consume("digits", one) is False
    logits = torch.randn(1, VOCAB + 64)
    sd.apply(logits, ["digits"])
    assert EOS in allowed_ids(logits[0])
    assert sd.consume("digits", one) is True
    sd.drop("digits")
    assert "digits" not in sd and "choice" in sd


# -- generation on random weights ---------------------------------------------------------------------
def generate(llm, so, seeds, **kw):
    params = [SamplingParams(max_tokens=kw.pop("max_tokens", 400), seed=s, structured_outputs=so, **kw)
              for s in seeds]
    return llm.generate(["Answer in JSON."] * len(params), params, use_tqdm=False)


@pytest.mark.parametrize("sch", [PERSON, NESTED], ids=["person", "nested"])
def test_json_schema_output_validates_for_several_seeds(llm, sch):
    outs = generate(llm, schema(sch), range(6))
    for o in outs:
        assert o.finish_reason == "stop", o.text
        jsonschema.validate(json.loads(o.text), sch)
    assert len({o.text for o in outs}) > 1  # the seeds matter: the grammar constrains, it does not dictate
    assert not llm.engine.structured.matchers  # every finished request dropped its grammar


def test_greedy_and_penalties_respect_the_mask(llm):
    greedy = generate(llm, schema(PERSON), [None], temperature=0)[0]
    jsonschema.validate(json.loads(greedy.text), PERSON)
    penalised = generate(llm, schema(PERSON), [3], repetition_penalty=1.3, presence_penalty=1.0, top_k=20,
                         top_p=0.9, logprobs=2)[0]
    jsonschema.validate(json.loads(penalised.text), PERSON)
    assert all(lp.logprob > float("-inf") for lp in penalised.logprobs)


@pytest.mark.parametrize("so,check", [
    (StructuredOutputs("regex", REGEX_CODE), lambda t: re.fullmatch(REGEX_CODE, t)),
    (StructuredOutputs("regex", REGEX_EMAIL), lambda t: re.fullmatch(REGEX_EMAIL, t)),
    (StructuredOutputs.choice(CHOICES), lambda t: t in CHOICES),
    (StructuredOutputs("grammar", LARK_SUM), lambda t: re.fullmatch(r"[0-9]{1,3}(\+[0-9]{1,3})*", t)),
    (StructuredOutputs("grammar", GBNF_WORD), lambda t: re.fullmatch(r"\([a-z]{1,5}\)", t)),
], ids=["regex_code", "regex_email", "choice", "lark", "gbnf"])
def test_regex_choice_and_grammars(llm, so, check):
    for o in generate(llm, so, range(4), max_tokens=64):
        assert check(o.text), o.text
        assert o.finish_reason == "stop" or so.kind == "grammar"  # a sum may go on until max_tokens


def test_constrained_and_free_requests_share_a_batch(llm):
    free = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    alone = llm.generate(["hello there"], free, use_tqdm=False)[0]
    outs = llm.generate(["hello there", "Answer in JSON."],
                        [free, SamplingParams(max_tokens=400, seed=1, structured_outputs=schema(PERSON))],
                        use_tqdm=False)
    assert outs[0].token_ids == alone.token_ids  # the free row is not masked
    jsonschema.validate(json.loads(outs[1].text), PERSON)


def test_preempted_constrained_requests_stay_valid():
    small = LLM("dummy:tiny", dtype="float32", token_budget=64, num_blocks=16, seed=0,
                enable_prefix_caching=False, max_model_len=2048)
    long_prompt = " ".join(["word"] * 60)
    params = [SamplingParams(max_tokens=120, seed=s, structured_outputs=schema(NESTED)) for s in range(4)]
    outs = small.generate([long_prompt] * 4, params, use_tqdm=False)
    assert sum(o.num_preemptions for o in outs) > 0, "the small pool must force preemption"
    for o in outs:
        jsonschema.validate(json.loads(o.text), NESTED)
    assert not small.engine.structured.matchers and small.engine.pools[0].num_used == 0


def test_abort_drops_the_grammar(llm):
    e = llm.engine
    rid = e.add_request("x", SamplingParams(max_tokens=50, structured_outputs=schema(PERSON)))
    assert rid in e.structured
    e.abort(rid)
    assert rid not in e.structured


def test_bad_spec_is_refused_at_add_request(llm):
    with pytest.raises(GrammarError, match="Invalid type"):
        llm.engine.add_request("x", SamplingParams(structured_outputs=schema({"type": "strin"})))
    assert not llm.engine.has_unfinished()


def test_sequence_parallel_engine_masks_on_the_sampling_rank():
    with LLM("dummy:tiny", dtype="float32", sp=2, token_budget=64, num_blocks=128, seed=0, max_model_len=2048,
             sp_threshold_tokens=32) as sp2:
        long_prompt = " ".join(["token"] * 80)  # above the threshold: its prefill is split over both ranks
        outs = sp2.generate([long_prompt, "short"],
                            [SamplingParams(max_tokens=400, seed=s, structured_outputs=schema(PERSON)) for s in (0, 1)],
                            use_tqdm=False)
    for o in outs:
        jsonschema.validate(json.loads(o.text), PERSON)


def test_a_failed_matcher_lets_only_eos_through(smollm2_tokenizer):
    sd = StructuredDecoding(smollm2_tokenizer, VOCAB, {EOS})
    sd.attach("r", StructuredOutputs.choice(["yes"]))
    wrong = smollm2_tokenizer.encode("no")[0]
    assert sd.consume("r", wrong) is True  # rejected: the matcher is in an error state, the request must stop
    logits = torch.randn(1, VOCAB)
    sd.apply(logits, ["r"])
    assert allowed_ids(logits[0]) == {EOS}


def test_grammar_jobs_answer_each_request_once_within_the_time_limit():
    import threading
    import time

    from csps.server.grammar_jobs import GrammarJobs

    release = threading.Event()

    def compile_fn(so):
        if so.spec == "slow":
            release.wait(10)
        if so.spec == "bad":
            raise GrammarError("x: the regex does not compile", "x")

    jobs, answers = GrammarJobs(compile_fn, timeout_s=0.2), {}
    for spec in ("fast", "bad", "slow"):
        jobs.submit(StructuredOutputs("regex", spec, "x"), lambda err, spec=spec: answers.setdefault(spec, []).append(err))
    t0 = time.monotonic()
    while jobs.pending and time.monotonic() - t0 < 5:
        jobs.poll()
        time.sleep(0.01)
    release.set()
    assert not jobs.pending and time.monotonic() - t0 < 1
    assert answers["fast"] == [None]
    assert isinstance(answers["bad"][0], GrammarError)
    assert "did not compile within 0.2 s" in str(answers["slow"][0]) and answers["slow"][0].param == "x"
    jobs.poll()
    assert all(len(v) == 1 for v in answers.values())
    jobs.shutdown()
