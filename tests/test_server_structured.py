"""Structured outputs and tool calls through real HTTP against ``csps serve --model dummy:tiny``.

The weights are random, so only the grammar can make the output valid: JSON that validates against its
schema for several seeds (streamed too), regex and choice matches, forced tool calls whose arguments
validate, and a 400 naming the problem for every bad schema, regex or grammar.
"""

import json
import random
import re
import string
import threading
import time

import httpx
import jsonschema
import openai
import pytest
from structured_cases import (
    CHOICES,
    GBNF_WORD,
    LARK_SUM,
    NESTED,
    PERSON,
    REGEX_CODE,
    REGEX_EMAIL,
    TIME_TOOL,
    WEATHER_TOOL,
)

from csps.server.testing import ServerProcess

MSGS = [{"role": "user", "content": "Describe a person."}]
TOOLS = [WEATHER_TOOL, TIME_TOOL]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@pytest.fixture(scope="module")
def server():
    with ServerProcess(["--model", "dummy:tiny", "--max-model-len", "2048"]) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def json_schema_format(schema, name="out"):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def stream_events(http, path, body) -> list[dict]:
    with http.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


def error_of(r, status=400) -> dict:
    assert r.status_code == status, r.text
    return r.json()["error"]


# -- JSON --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("schema", [PERSON, NESTED], ids=["person", "nested"])
def test_chat_json_schema_validates_for_several_seeds(client, schema):
    r = client.chat.completions.create(model="dummy:tiny", messages=MSGS, n=4, seed=11, max_tokens=400,
                                       response_format=json_schema_format(schema))
    assert len(r.choices) == 4
    for c in r.choices:
        assert c.finish_reason == "stop", c.message.content
        jsonschema.validate(json.loads(c.message.content), schema)
    assert len({c.message.content for c in r.choices}) > 1


def test_streamed_json_schema_validates(http):
    for seed in (1, 2, 3):
        events = stream_events(http, "/v1/chat/completions", {
            "messages": MSGS, "seed": seed, "max_tokens": 400, "response_format": json_schema_format(PERSON)})
        text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
        assert len(events) > 5  # it streamed, token by token
        assert events[-1]["choices"][0]["finish_reason"] == "stop"
        jsonschema.validate(json.loads(text), PERSON)


def test_completions_take_response_format_and_structured_outputs_json(http):
    for body in ({"response_format": json_schema_format(NESTED)}, {"structured_outputs": {"json": NESTED}},
                 {"structured_outputs": {"json": json.dumps(NESTED)}}):
        r = http.post("/v1/completions", json={"prompt": "JSON:", "max_tokens": 400, "seed": 5, **body})
        assert r.status_code == 200, r.text
        jsonschema.validate(json.loads(r.json()["choices"][0]["text"]), NESTED)


def test_json_object_parses(http):
    # any object: random weights may write strings of thousands of tokens, so many choices, and every one that
    # finished must be an object while one cut off by max_tokens must at least be the start of one
    for body in ({"response_format": {"type": "json_object"}}, {"structured_outputs": {"json_object": True}}):
        r = http.post("/v1/chat/completions", json={"messages": MSGS, "n": 16, "seed": 3, "max_tokens": 32, **body})
        assert r.status_code == 200, r.text
        finished = [c for c in r.json()["choices"] if c["finish_reason"] == "stop"]
        assert finished
        for c in finished:
            assert isinstance(json.loads(c["message"]["content"]), dict)
        for c in r.json()["choices"]:
            assert c["message"]["content"].startswith("{")


# -- regex, choice, grammars --------------------------------------------------------------------------
@pytest.mark.parametrize("regex", [REGEX_CODE, REGEX_EMAIL], ids=["code", "email"])
def test_regex_constrained_completion_matches(http, regex):
    r = http.post("/v1/completions", json={"prompt": "Write it:", "n": 4, "seed": 7, "max_tokens": 40,
                                           "structured_outputs": {"regex": regex}})
    assert r.status_code == 200, r.text
    for c in r.json()["choices"]:
        assert re.fullmatch(regex, c["text"]), c["text"]
        assert c["finish_reason"] == "stop"
    events = stream_events(http, "/v1/completions", {"prompt": "Write it:", "seed": 8, "max_tokens": 40,
                                                     "structured_outputs": {"regex": regex}})
    assert re.fullmatch(regex, "".join(e["choices"][0]["text"] for e in events if e["choices"]))


@pytest.mark.parametrize("so,pattern", [
    ({"choice": CHOICES}, "|".join(CHOICES)),
    ({"grammar": LARK_SUM}, r"[0-9]{1,3}(\+[0-9]{1,3})*"),
    ({"grammar": GBNF_WORD}, r"\([a-z]{1,5}\)"),
], ids=["choice", "lark", "gbnf"])
def test_choice_and_grammars(http, so, pattern):
    r = http.post("/v1/chat/completions", json={"messages": MSGS, "n": 4, "seed": 9, "max_tokens": 40,
                                                "structured_outputs": so})
    assert r.status_code == 200, r.text
    for c in r.json()["choices"]:
        assert re.fullmatch(pattern, c["message"]["content"]), c["message"]["content"]


# -- tool calls ---------------------------------------------------------------------------------------
def test_tool_choice_required_returns_calls_whose_arguments_validate(client):
    r = client.chat.completions.create(model="dummy:tiny", messages=MSGS, tools=TOOLS, tool_choice="required",
                                       n=4, seed=21, max_tokens=400)
    for c in r.choices:
        assert c.finish_reason == "tool_calls" and c.message.content is None
        assert c.message.tool_calls
        for call in c.message.tool_calls:
            assert call.type == "function" and call.id.startswith("call_")
            jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])
    names = {call.function.name for c in r.choices for call in c.message.tool_calls}
    assert names <= set(PARAMS)


def test_streamed_required_tool_calls(http):
    events = stream_events(http, "/v1/chat/completions", {"messages": MSGS, "tools": TOOLS, "seed": 4,
                                                          "tool_choice": "required", "max_tokens": 400})
    calls = [tc for e in events for tc in e["choices"][0]["delta"].get("tool_calls", [])]
    assert calls and [tc["index"] for tc in calls] == list(range(len(calls)))
    for tc in calls:
        assert tc["id"].startswith("call_") and tc["type"] == "function"
        jsonschema.validate(json.loads(tc["function"]["arguments"]), PARAMS[tc["function"]["name"]])
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_named_tool_choice_streams_its_arguments(client):
    forced = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(model="dummy:tiny", messages=MSGS, tools=TOOLS, tool_choice=forced,
                                       seed=5, max_tokens=400)
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and r.choices[0].finish_reason == "tool_calls"
    jsonschema.validate(json.loads(call.function.arguments), PARAMS["get_weather"])
    chunks = list(client.chat.completions.create(model="dummy:tiny", messages=MSGS, tools=TOOLS,
                                                 tool_choice=forced, seed=6, max_tokens=400, stream=True))
    deltas = [tc for ch in chunks for tc in (ch.choices[0].delta.tool_calls or [])]
    assert deltas[0].id and deltas[0].function.name == "get_weather"
    assert len(deltas) > 3  # the arguments came piece by piece
    jsonschema.validate(json.loads("".join(d.function.arguments or "" for d in deltas)), PARAMS["get_weather"])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_auto_lets_the_model_answer_in_text(http):
    r = http.post("/v1/chat/completions", json={"messages": MSGS, "tools": TOOLS, "seed": 1, "max_tokens": 8})
    c = r.json()["choices"][0]
    assert r.status_code == 200 and c["message"]["content"] and "tool_calls" not in c["message"]
    assert c["finish_reason"] in ("stop", "length")


def test_tool_results_go_through_the_template(http):
    call = {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": '{"tz": "UTC"}'}}
    convo = MSGS + [{"role": "assistant", "content": None, "tool_calls": [call]},
                    {"role": "tool", "tool_call_id": "call_1", "content": "12:00"}]
    with_result = http.post("/v1/chat/completions", json={"messages": convo, "tools": TOOLS, "max_tokens": 1})
    without = http.post("/v1/chat/completions", json={"messages": MSGS, "tools": TOOLS, "max_tokens": 1})
    assert with_result.status_code == 200, with_result.text
    grown = with_result.json()["usage"]["prompt_tokens"] - without.json()["usage"]["prompt_tokens"]
    assert grown >= 20  # the call (name, arguments) and its result are in the prompt


# -- bad input ----------------------------------------------------------------------------------------
CHAT_ERRORS = [
    ({"response_format": json_schema_format({"type": "strin"})}, "Invalid type: strin",
     "response_format.json_schema.schema"),
    ({"response_format": json_schema_format({"type": "array", "uniqueItems": True})}, "uniqueItems",
     "response_format.json_schema.schema"),
    ({"response_format": json_schema_format({"type": "string", "pattern": "(("})}, "unclosed group",
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema"}}, "needs a 'json_schema' object", "response_format"),
    ({"response_format": {"type": "yaml"}}, "Input should be", "response_format.type"),
    ({"structured_outputs": {"regex": "(("}}, "the regex does not compile", "structured_outputs.regex"),
    ({"structured_outputs": {"grammar": "start: nowhere"}}, "the grammar does not compile", "structured_outputs.grammar"),
    ({"structured_outputs": {"json": "{not json"}}, "not valid JSON", "structured_outputs.json"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "exactly one of", "structured_outputs"),
    ({"structured_outputs": {"choice": ["a", ""]}}, "non-empty strings", "structured_outputs.choice"),
    ({"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}}, "not both", None),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "'nope'",
     "tool_choice.function.name"),
    ({"tool_choice": "required"}, "tool_choice needs 'tools'", "tool_choice"),
    ({"tools": [{"type": "function"}]}, "'tools.0.function' is required", "tools.0.function"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "strin"}}}],
      "tool_choice": "required"}, "Invalid type: strin", "tools"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "cannot be combined",
     "tool_choice"),
]


@pytest.mark.parametrize("body,fragment,param", CHAT_ERRORS, ids=[c[1][:24] for c in CHAT_ERRORS])
def test_bad_structured_requests_are_400s_naming_the_problem(http, body, fragment, param):
    err = error_of(http.post("/v1/chat/completions", json={"messages": MSGS, "max_tokens": 5, **body}))
    assert fragment in err["message"] and err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param


def test_a_spec_over_the_size_limit_is_refused(http):
    err = error_of(http.post("/v1/completions", json={"prompt": "x", "structured_outputs": {"regex": "a" * 1_000_001}}))
    assert "at most 1,000,000" in err["message"] and err["param"] == "structured_outputs.regex"


def test_openapi_documents_the_new_fields(http):
    schemas = http.get("/openapi.json").json()["components"]["schemas"]
    chat, comp = schemas["ChatCompletionRequest"]["properties"], schemas["CompletionRequest"]["properties"]
    for props in (chat, comp):
        assert {"response_format", "structured_outputs"} <= set(props)
    assert chat["tools"]["anyOf"][0]["items"]["$ref"].endswith("/Tool")
    assert {"none", "auto", "required"} <= set(chat["tool_choice"]["anyOf"][0]["enum"])
    assert set(schemas["StructuredOutputsRequest"]["properties"]) == {"json", "regex", "choice", "grammar", "json_object"}
    assert "tool_calls" in schemas["ChatMessage"]["properties"]
    assert schemas["ResponseFormat"]["properties"]["type"]["enum"] == ["text", "json_object", "json_schema"]


# -- compiling off the engine's loop --------------------------------------------------------------------
def slow_schema(n: int) -> dict:
    """Many alternative objects: 450 take ~1.3 s to compile here (600 are over llguidance's size limit)."""
    rng = random.Random(n)
    word = lambda: "".join(rng.choice(string.ascii_lowercase) for _ in range(6))  # noqa: E731
    return {"anyOf": [{"type": "object", "properties": {word(): {"type": "integer"} for _ in range(20)},
                       "additionalProperties": False} for _ in range(n)]}


def test_other_requests_run_while_a_grammar_compiles(http):
    done = {}

    def constrained():
        r = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 5, "seed": 1,
                                               "response_format": json_schema_format(slow_schema(450))})
        done["constrained"] = (time.monotonic(), r.status_code)

    t = threading.Thread(target=constrained)
    t.start()
    time.sleep(0.2)  # the big schema is on its way to the engine, compiling
    r = http.post("/v1/completions", json={"prompt": "hello", "max_tokens": 20, "ignore_eos": True})
    plain_done = time.monotonic()
    t.join()
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 20
    assert done["constrained"][1] == 200
    assert plain_done < done["constrained"][0]  # the plain request did not wait for the compile


def test_a_grammar_too_slow_to_compile_is_a_400_in_bounded_time():
    with ServerProcess(["--model", "dummy:tiny", "--max-model-len", "512", "--grammar-compile-timeout", "0.05"]) as srv:
        body = {"prompt": "x", "max_tokens": 5, "response_format": json_schema_format(slow_schema(450))}
        t0 = time.monotonic()
        r = httpx.post(srv.url + "/v1/completions", json=body, timeout=60)
        elapsed = time.monotonic() - t0
        err = error_of(r)
        assert "did not compile within 0.05 s" in err["message"] and err["param"] == "response_format.json_schema.schema"
        assert elapsed < 5  # the limit plus the engine's loop, not the compile
        ok = httpx.post(srv.url + "/v1/completions", json={"prompt": "x", "max_tokens": 3}, timeout=60)
        assert ok.status_code == 200  # the engine goes on serving
