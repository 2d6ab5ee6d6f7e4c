"""Coding assistants over real HTTP (random-weight tiny model, float32): llama.cpp's /infill and /completion,
SSE keepalive comments, prefill progress, max_tokens 0 warm-ups. The tiny model shares SmolLM2's tokenizer,
which has repository tokens but no FIM tokens, so the server forces the StarCoder template."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
from csps.cli import build_parser
from csps.server.testing import ServerProcess

MAX_MODEL_LEN = 8192
KEEPALIVE_S = 0.02  # the tiny model prefills ~7k tokens in ~0.13 s on 2 AVX2 cores: ~6 keepalives


def repo_file(num_chars: int = 6000, seed: int = 0) -> str:
    """Python-looking source of about ``num_chars`` characters (a repository file)."""
    lines, i = [], 0
    while sum(len(x) for x in lines) < num_chars:
        lines.append(f"def helper_{seed}_{i}(value, scale={i % 7}):\n    return value * scale + {i * 13 % 101}\n\n")
        i += 1
    return "".join(lines)[:num_chars]


@pytest.fixture(scope="module")
def server():
    args = ["--model", "dummy:tiny", "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN),
            "--token-budget", "256", "--fim-template", "starcoder", "--sse-keepalive-interval", str(KEEPALIVE_S)]
    with ServerProcess(args) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=300) as c:
        yield c


def sse_lines(http: httpx.Client, path: str, body: dict) -> list[str]:
    """Every non-empty line of a streamed response, comments included."""
    with http.stream("POST", path, json=body) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return [line for line in r.iter_lines() if line]


def data(lines: list[str]) -> list[dict]:
    return [json.loads(x[6:]) for x in lines if x.startswith("data: ") and x != "data: [DONE]"]


INFILL = {"input_prefix": "def area(radius):\n    ", "input_suffix": "\n\nprint(area(2))\n",
          "input_extra": [{"filename": "geometry/util.py", "text": repo_file(), "time": 1700000000}],
          "n_predict": 6, "temperature": 0, "ignore_eos": True}


def test_the_forced_template_is_logged_and_reported(server, http):
    assert "FIM template starcoder: <fim_prefix> <fim_suffix> <fim_middle> are not tokens" in server.log
    assert http.get("/stats").json()["engine"]["fim"] == "starcoder"


def test_infill_answers_with_content_and_timings_and_its_repeat_is_cached(http):
    first = http.post("/infill", json=INFILL).json()
    assert first["stop"] is True and isinstance(first["content"], str) and first["tokens_predicted"] == 6
    assert first["stop_type"] == "limit" and first["generation_settings"]["fim_template"] == "starcoder"
    assert first["tokens_cached"] == 0 and first["tokens_evaluated"] > 1000
    t = first["timings"]
    assert t["prompt_n"] == first["tokens_evaluated"] and t["prompt_ms"] > 0 and t["predicted_n"] == 6
    assert t["predicted_ms"] > 0 and t["prompt_per_second"] > 0
    again = http.post("/infill", json={**INFILL, "input_prefix": "def volume(radius):\n    "}).json()
    assert again["tokens_cached"] > 1000  # the repository context, from the prefix cache
    assert again["timings"]["prompt_n"] == again["tokens_evaluated"] - again["tokens_cached"] < 100
    assert again["timings"]["cache_n"] == again["tokens_cached"]


def test_infill_warm_up_then_the_completion_starts_from_the_cache(http):
    extra = [{"filename": "pkg/new.py", "text": repo_file(seed=1)}]
    warm = http.post("/infill", json={"input_extra": extra, "n_predict": 0, "samplers": [], "cache_prompt": True,
                                      "t_max_prompt_ms": 500, "t_max_predict_ms": 1}).json()  # llama.vscode's
    assert warm["content"] == "" and warm["tokens_predicted"] == 0 and warm["timings"]["predicted_n"] == 0
    assert warm["tokens_cached"] == 0 and warm["timings"]["prompt_ms"] > 0
    real = http.post("/infill", json={**INFILL, "input_extra": extra}).json()
    assert real["tokens_cached"] > 1000 and real["tokens_predicted"] == 6


def test_v1_completions_suffix_uses_the_same_template(http):
    pre, suf = "def add(a, b):\n    return ", "\n\nprint(add(1, 2))\n"
    openai_style = http.post("/v1/completions", json={"prompt": pre, "suffix": suf, "max_tokens": 2}).json()
    llama_style = http.post("/infill", json={"input_prefix": pre, "input_suffix": suf, "n_predict": 2}).json()
    # each piece tokenized on its own; the markers are text here (SmolLM2's vocabulary has no FIM tokens)
    pieces = ["<fim_prefix>", pre, "<fim_suffix>", suf, "<fim_middle>"]
    expected = sum(http.post("/tokenize", json={"prompt": p}).json()["count"] for p in pieces)
    assert openai_style["usage"]["prompt_tokens"] == llama_style["tokens_evaluated"] == expected


def test_streamed_infill_in_llama_cpps_shape(http):
    body = {**INFILL, "input_prefix": "class Shape:\n    "}
    http.post("/infill", json=body)  # the same prefix-cache state for the two compared below
    whole = http.post("/infill", json=body).json()
    lines = sse_lines(http, "/infill", {**body, "stream": True})
    assert "data: [DONE]" not in lines  # llama.cpp's native endpoints end without it
    chunks = data(lines)
    assert [c["stop"] for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert "".join(c["content"] for c in chunks) == whole["content"]
    assert sum(len(c["tokens"]) for c in chunks) == 6  # streamed chunks carry their token ids
    assert chunks[-1]["tokens_cached"] == whole["tokens_cached"] > 1000 and "timings" in chunks[-1]


def test_completion_endpoint_prompts_stops_and_response_fields(http):
    prompt = "The quick brown fox"  # shorter than a KV block: no prefix cache, the same numerics every time
    base = {"prompt": prompt, "n_predict": 8, "temperature": 0, "ignore_eos": True}
    full = http.post("/completion", json={**base, "return_tokens": True}).json()
    assert len(full["tokens"]) == full["tokens_predicted"] == 8 and full["stop_type"] == "limit"
    ids = http.post("/tokenize", json={"prompt": prompt}).json()["tokens"]
    assert http.post("/completion", json={**base, "prompt": ids}).json()["content"] == full["content"]
    text = full["content"]
    word = text[len(text) // 2: len(text) // 2 + 3]
    cut = http.post("/completion", json={**base, "stop": [word]}).json()
    assert cut["stop_type"] == "word" and cut["stopping_word"] == word
    assert cut["content"] == text[:text.index(word)]
    few = http.post("/completion", json={**base, "response_fields": ["content", "timings/prompt_n", "nope"]}).json()
    assert few == {"content": text, "timings/prompt_n": full["tokens_evaluated"]}
    chunks = data(sse_lines(http, "/completion", {**base, "stream": True}))  # Continue's llama.cpp provider
    assert "".join(c["content"] for c in chunks) == text and chunks[-1]["stop"]


def test_keepalive_comments_come_before_the_first_token_of_a_long_prefill(http):
    prompt = "keepalive " + "lorem ipsum " * 1500  # no other test's prefix, so nothing comes from the cache
    assert 6500 < http.post("/tokenize", json={"prompt": prompt}).json()["count"] < 8000  # ~7.5k tokens
    lines = sse_lines(http, "/v1/completions", {"prompt": prompt, "max_tokens": 2, "stream": True})
    first_data = next(i for i, x in enumerate(lines) if x.startswith("data: "))
    assert first_data >= 1 and set(lines[:first_data]) == {": keepalive"}
    chunks = data(lines)
    assert chunks[0]["choices"][0]["text"] is not None and lines[-1] == "data: [DONE]"


def test_the_openai_client_reads_streams_with_keepalives(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    stream = client.completions.create(model="dummy:tiny", prompt="amet consectetur " * 650, max_tokens=3,
                                       stream=True, extra_body={"ignore_eos": True})
    assert len([c for c in stream if c.choices and c.choices[0].text]) >= 1


def check_progress(reports: list[dict], total: int) -> None:
    processed = [p["processed"] for p in reports]
    assert len(reports) >= 2 and processed == sorted(processed) and processed[-1] == total
    assert all(p["total"] == total and p["cached"] == p["cache"] for p in reports)
    assert [p["time_ms"] for p in reports] == sorted(p["time_ms"] for p in reports)


def test_prefill_progress_on_completions_chat_and_infill(http):
    body = {"prompt": "progress report " * 400, "max_tokens": 2, "stream": True, "return_progress": True,
            "stream_options": {"include_usage": True}}
    chunks = data(sse_lines(http, "/v1/completions", body))
    firsts = next(i for i, c in enumerate(chunks) if c["choices"])
    reports = [c["prompt_progress"] for c in chunks[:firsts]]
    assert all(c["choices"] == [] for c in chunks[:firsts]) and "prompt_progress" not in json.dumps(chunks[firsts:])
    check_progress(reports, chunks[-1]["usage"]["prompt_tokens"])

    chat = {"messages": [{"role": "user", "content": "chat progress " * 400}], "max_tokens": 2, "stream": True,
            "return_progress": True, "stream_options": {"include_usage": True}}
    chunks = data(sse_lines(http, "/v1/chat/completions", chat))
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    reports = [c["prompt_progress"] for c in chunks if "prompt_progress" in c]
    assert all(c["choices"] == [] for c in chunks if "prompt_progress" in c)
    check_progress(reports, chunks[-1]["usage"]["prompt_tokens"])

    chunks = data(sse_lines(http, "/infill", {**INFILL, "input_prefix": "x = ", "stream": True,
                                              "return_progress": True, "input_extra": [
                                                  {"filename": "p.py", "text": repo_file(seed=2)}]}))
    reports = [c["prompt_progress"] for c in chunks if "prompt_progress" in c]
    check_progress(reports, chunks[-1]["tokens_evaluated"])
    assert all(c["content"] == "" and not c["stop"] for c in chunks if "prompt_progress" in c)


def test_summarize_streams_the_final_passs_prefill_progress(http):
    doc = "The committee met on Monday. It discussed the budget and the new library. " * 60
    events = data(sse_lines(http, "/v1/summarize", {"text": doc, "max_tokens": 4, "stream": True,
                                                    "return_progress": True}))
    kinds = [e.get("object") for e in events]
    assert kinds[0] == "summary.plan" and kinds[-1] == "summary"
    reports = [e["prompt_progress"] for e in events if e.get("object") == "summary.prompt_progress"]
    check_progress(reports, events[-1]["usage"]["final_prompt_tokens"])
    assert all(e["stage"] == "final" for e in events if e.get("object") == "summary.prompt_progress")


def test_max_tokens_zero_warms_the_prefix_cache_for_openai_endpoints(http):
    context = repo_file(seed=3)
    warm = http.post("/v1/completions", json={"prompt": context, "max_tokens": 0}).json()
    assert warm["choices"][0]["text"] == "" and warm["choices"][0]["finish_reason"] == "length"
    assert warm["usage"]["completion_tokens"] == 0 and warm["usage"]["prompt_tokens"] > 1000
    hit = http.post("/v1/completions", json={"prompt": context + "\n# and one more line", "max_tokens": 2}).json()
    assert hit["usage"]["prompt_tokens_details"]["cached_tokens"] > 1000
    msgs = [{"role": "system", "content": context}, {"role": "user", "content": "hi"}]
    chat = http.post("/v1/chat/completions", json={"messages": msgs, "max_completion_tokens": 0}).json()
    assert chat["choices"][0]["message"]["content"] == "" and chat["usage"]["completion_tokens"] == 0
    streamed = data(sse_lines(http, "/v1/completions", {"prompt": context, "max_tokens": 0, "stream": True}))
    assert [c["choices"][0]["finish_reason"] for c in streamed] == ["length"]


def test_a_client_that_leaves_a_stream_aborts_its_request(http):
    body = {**INFILL, "input_extra": [{"filename": "q.py", "text": repo_file(12000, seed=4)}], "n_predict": 500,
            "stream": True}
    with http.stream("POST", "/infill", json=body) as r:
        next(r.iter_lines())  # a keepalive or a first chunk, then hang up
    deadline = time.monotonic() + 30
    while (s := http.get("/stats").json()["stats"])["num_running"] + s["num_waiting"] > 0:
        assert time.monotonic() < deadline, "the abandoned request still runs"
        time.sleep(0.05)


def test_openapi_documents_the_llama_endpoints(http):
    doc = http.get("/openapi.json").json()
    schemas = doc["components"]["schemas"]
    for path, model, field in (("/infill", "InfillRequest", "input_extra"),
                               ("/completion", "LlamaCompletionRequest", "prompt")):
        op = doc["paths"][path]["post"]
        assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"] == f"#/components/schemas/{model}"
        assert "text/event-stream" in op["responses"]["200"]["content"] and "400" in op["responses"]
        s = schemas[model]
        assert field in s["properties"] and s["additionalProperties"] is False
        assert s["properties"]["n_predict"]["maximum"] == MAX_MODEL_LEN - 1 and s["properties"]["n_predict"][
            "minimum"] == -1
        # what the validators enforce beyond the field types: samplers csps lacks only 'off', progress only streamed
        assert s["properties"]["mirostat"]["const"] == 0 and s["properties"]["typical_p"]["const"] == 1.0
        assert {"if": {"required": ["return_progress"], "properties": {"return_progress": {"const": True}}},
                "then": {"required": ["stream"], "properties": {"stream": {"const": True}}}} in s["allOf"]
    assert schemas["InfillRequest"]["description"] == "fill-in-the-middle with the 'starcoder' template"
    assert schemas["ExtraFile"]["required"] == ["text"]


def test_keepalive_and_fim_flags_parse_from_the_config_file(tmp_path):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("model: dummy:tiny\nsse-keepalive-interval: 2.5\nfim_template: qwen\n")
    a = build_parser().parse_args(["serve", "--config", str(cfg)])
    assert a.sse_keepalive_interval == 2.5 and a.fim_template == "qwen"
    assert build_parser().parse_args(["serve"]).sse_keepalive_interval == 15.0
    for off in ("0", "off"):  # no keepalive at all (vllm bench serve fails streams that get one before a token)
        assert build_parser().parse_args(["serve", "--sse-keepalive-interval", off]).sse_keepalive_interval == 0.0
    for bad in (["--sse-keepalive-interval", "-1"], ["--sse-keepalive-interval", "soon"], ["--fim-template", "gpt"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", *bad])
