"""Bad input gets the right status and a clear OpenAI-shaped error; limits: API key, body size, queue."""

import json
import time

import httpx
import openai
import pytest
from csps.server.testing import ServerProcess

MAX_MODEL_LEN = 256
KEY = "sekret-key"
MAX_BODY = 4096


@pytest.fixture(scope="module")
def server():
    # one running sequence at a time and one waiting: the third concurrent request gets 429
    args = ["--model", "dummy:tiny", "--max-model-len", str(MAX_MODEL_LEN), "--api-key", KEY,
            "--max-body-bytes", str(MAX_BODY), "--max-num-seqs", "1", "--max-waiting", "1"]
    with ServerProcess(args) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    return err


def post(http, path: str, body) -> httpx.Response:
    return http.post(path, content=body if isinstance(body, bytes) else json.dumps(body).encode(),
                     headers={"Content-Type": "application/json"})


COMPLETION_CASES = [
    # (body, message fragment, param)
    ({"prompt": "hi", "max_tokens": 4, "bogus": 1}, "unrecognized request argument: 'bogus'", "bogus"),
    ({"prompt": "hi", "temperature": 5}, "less than or equal to 2", "temperature"),
    ({"prompt": "hi", "max_tokens": -1}, "greater than or equal to 0", "max_tokens"),  # 0: a prefill-only warm-up
    ({"prompt": "hi", "max_tokens": "many"}, "valid integer", "max_tokens"),
    ({"prompt": "hi", "top_p": 0}, "greater than 0", "top_p"),
    ({"prompt": "hi", "n": 0}, "greater than or equal to 1", "n"),
    ({"prompt": "hi", "logprobs": 99}, "less than or equal to 20", "logprobs"),
    ({"prompt": "hi", "presence_penalty": 3}, "less than or equal to 2", "presence_penalty"),
    ({"prompt": "hi", "stop": [""]}, "stop strings must not be empty", None),
    ({"prompt": "hi", "stop": ["x"] * 100}, "at most 64 stop strings are allowed, got 100", None),
    ({"prompt": "hi", "stop": ["x" * 300]}, "at most 256 characters, got 300", None),
    ({"prompt": "hi", "logit_bias": {"1": 5}}, "logit_bias is not supported", None),
    ({"prompt": "hi", "echo": True}, "echo is not supported", None),
    ({"prompt": ""}, "the prompt is empty", "prompt"),
    ({"prompt": []}, "the prompt is empty", "prompt"),
    ({"prompt": ["ok", ""]}, "the prompt is empty", "prompt"),
    ({"max_tokens": 3}, "'prompt' is required", "prompt"),
    ({"prompt": [1, 2, 10**9]}, "outside the vocabulary", "prompt"),
    ({"prompt": "hi", "suffix": "there"}, "fill-in-the-middle", "suffix"),
    ({"prompt": "hi", "stream_options": {"include_usage": True}}, "only allowed when stream is true", None),
    ({"prompt": "hi", "return_progress": True}, "return_progress is only allowed when stream is true", None),
]


@pytest.mark.parametrize("body,fragment,param", COMPLETION_CASES, ids=[c[1][:30] for c in COMPLETION_CASES])
def test_completion_bad_values(http, body, fragment, param):
    err = error_of(post(http, "/v1/completions", body), 400)
    assert fragment in err["message"]
    assert err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param


def test_prompt_plus_max_tokens_over_context_says_the_numbers(http):
    n_prompt = http.post("/tokenize", json={"prompt": "count me " * 20}).json()["count"]
    err = error_of(post(http, "/v1/completions", {"prompt": "count me " * 20, "max_tokens": 250}), 400)
    msg = err["message"]
    assert f"maximum context length is {MAX_MODEL_LEN} tokens" in msg
    assert f"{n_prompt + 250} were requested ({n_prompt} in the prompt, 250 for the completion)" in msg
    assert err["param"] == "max_tokens"
    long_chat = {"messages": [{"role": "user", "content": "word " * 400}]}
    assert "maximum context length" in error_of(post(http, "/v1/chat/completions", long_chat), 400)["message"]


CHAT_CASES = [
    ({"messages": []}, "at least 1 item", "messages"),
    ({"messages": [{"role": "user", "content": ""}]}, "the messages are empty", "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "Input should be", "messages.0.role"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, "'tools.0.function' is required",
     "tools.0.function"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "needs logprobs", None),
    ({"messages": "hi"}, "valid list", "messages"),
]


@pytest.mark.parametrize("body,fragment,param", CHAT_CASES, ids=[c[1][:30] for c in CHAT_CASES])
def test_chat_bad_values(http, body, fragment, param):
    err = error_of(post(http, "/v1/chat/completions", body), 400)
    assert fragment in err["message"]
    if param is not None:
        assert err["param"] == param


LLAMA_CASES = [  # llama.cpp's /completion and /infill: the same error shape, llama.cpp's field names
    ("/completion", {"prompt": "hi", "n_predict": -2}, "greater than or equal to -1", "n_predict"),
    ("/completion", {"prompt": "hi", "mirostat": 2}, "mirostat is not supported", None),
    ("/completion", {"prompt": "hi", "grammar": "root ::= x"}, "unrecognized request argument: 'grammar'", "grammar"),
    ("/completion", {"prompt": ""}, "the prompt is empty", "prompt"),
    ("/completion", {"n_predict": 3}, "'prompt' is required", "prompt"),
    ("/completion", {"prompt": "count me " * 20, "n_predict": 250}, "lower n_predict", "n_predict"),
    ("/completion", {"prompt": "hi", "return_progress": True}, "only allowed when stream is true", None),
    ("/infill", {"input_prefix": "def f(", "input_extra": [{"filename": "a.py"}]}, "'input_extra.0.text' is required",
     "input_extra.0.text"),
    ("/infill", {"input_prefix": "def f(", "input_suffix": ")"}, "/infill needs fill-in-the-middle tokens", None),
]


@pytest.mark.parametrize("path,body,fragment,param", LLAMA_CASES, ids=[c[2][:30] for c in LLAMA_CASES])
def test_llama_endpoints_bad_values(http, path, body, fragment, param):
    err = error_of(post(http, path, body), 400)
    assert fragment in err["message"]
    assert err["param"] == param


@pytest.mark.parametrize("raw,fragment", [
    (b'{"prompt": "hi", "max_tokens": 3', "malformed JSON"),
    (b"", "the request body is empty"),
    (b"[1, 2]", "must be a JSON object"),
    (b'{"prompt": "caf\xe9"}', "not valid UTF-8"),
])
def test_malformed_bodies(http, raw, fragment):
    err = error_of(post(http, "/v1/completions", raw), 400)
    assert fragment in err["message"]


def test_unknown_model_and_endpoint(http):
    err = error_of(post(http, "/v1/completions", {"model": "gpt-9", "prompt": "hi"}), 404)
    assert "gpt-9" in err["message"] and err["code"] == "model_not_found"
    assert "no such endpoint" in error_of(http.get("/v1/nothing"), 404)["message"]


def test_api_key(server):
    body = {"prompt": "hi", "max_tokens": 2}
    err = error_of(httpx.post(server.url + "/v1/completions", json=body), 401)
    assert "API key" in err["message"] and err["code"] == "invalid_api_key"
    error_of(httpx.post(server.url + "/v1/completions", json=body, headers={"Authorization": "Bearer wrong"}), 401)
    error_of(httpx.post(server.url + "/tokenize", json={"prompt": "x"}), 401)
    assert httpx.get(server.url + "/health").status_code == 200  # health and metrics stay open
    assert httpx.get(server.url + "/metrics").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    good = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    assert good.completions.create(model="dummy:tiny", prompt="hi", max_tokens=2).usage.completion_tokens >= 1


def test_body_too_large(http):
    big = {"prompt": "x" * (MAX_BODY + 10)}
    err = error_of(post(http, "/v1/completions", big), 413)
    assert str(MAX_BODY) in err["message"] and err["code"] == "request_too_large"

    def chunks():  # no Content-Length: counted while reading
        for _ in range(10):
            yield b" " * 1000
    r = http.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert error_of(r, 413)["code"] == "request_too_large"


def test_queue_full_gets_429_with_retry_after(server, http):
    def stats():
        return http.get("/stats").json()["stats"]

    long_body = {"prompt": "go on", "max_tokens": 200, "stream": True, "ignore_eos": True}
    with http.stream("POST", "/v1/completions", json=long_body) as a:
        assert a.status_code == 200
        with http.stream("POST", "/v1/completions", json=long_body) as b:
            assert b.status_code == 200
            deadline = time.monotonic() + 20
            while stats()["num_waiting"] < 1:
                assert time.monotonic() < deadline, "the second request never queued"
                time.sleep(0.05)
            r = post(http, "/v1/completions", {"prompt": "one more", "max_tokens": 2})
            err = error_of(r, 429)
            assert int(r.headers["Retry-After"]) >= 1
            assert "waiting" in err["message"] and err["type"] == "rate_limit_error"
            with pytest.raises(openai.RateLimitError):
                openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0).completions.create(
                    model="dummy:tiny", prompt="again", max_tokens=2)
    deadline = time.monotonic() + 20
    while (s := stats())["num_running"] + s["num_waiting"] > 0:
        assert time.monotonic() < deadline, "aborted requests still in the engine"
        time.sleep(0.05)
