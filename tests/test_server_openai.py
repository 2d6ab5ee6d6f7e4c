"""The OpenAI-compatible API against a real ``csps serve`` subprocess (random-weight tiny model).

One server for the whole module. Prompts that must give identical outputs twice are shorter than a
KV block (16 tokens), so the prefix cache cannot change their numerics.
"""

import asyncio
import json
import socket
import time

import httpx
import openai
import pytest
from csps.server.testing import ServerProcess
from prometheus_client.parser import text_string_to_metric_families

MAX_MODEL_LEN = 1024
SHORT = "The quick brown fox"  # < 16 tokens


@pytest.fixture(scope="module")
def server():
    with ServerProcess(["--model", "dummy:tiny", "--max-model-len", str(MAX_MODEL_LEN)]) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def stats(server) -> dict:
    return httpx.get(server.url + "/stats", timeout=30).json()["stats"]


def num_tokens(server, text: str) -> int:
    return httpx.post(server.url + "/tokenize", json={"prompt": text}, timeout=30).json()["count"]


def wait_for(cond, timeout_s: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_models_and_health(server, client, model):
    assert model == "dummy:tiny"
    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ready"
    assert "csps serving dummy:tiny" in server.log and "layout sp=1 x tp=1" in server.log
    assert "KV cache" in server.log
    # the API process never loads torch (the engine process does)
    with open(f"/proc/{server.proc.pid}/maps") as f:
        maps = f.read()
    assert "libtorch" not in maps
    with open(f"/proc/{h['engine_pid']}/maps") as f:
        assert "libtorch" in f.read()


def test_completion(server, client, model):
    r = client.completions.create(model=model, prompt=SHORT, max_tokens=7, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert len(r.choices) == 1 and r.choices[0].finish_reason == "length" and r.choices[0].text
    assert r.usage.completion_tokens == 7
    assert r.usage.prompt_tokens == num_tokens(server, SHORT)
    assert r.usage.total_tokens == r.usage.prompt_tokens + 7


def test_completion_stream_matches_non_stream(client, model):
    kw = dict(model=model, prompt=SHORT, max_tokens=9, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 9
    assert all(c.usage is None for c in chunks[:-1])


def test_token_id_prompt_and_batch(server, client, model):
    ids = httpx.post(server.url + "/tokenize", json={"prompt": SHORT}).json()["tokens"]
    a = client.completions.create(model=model, prompt=ids, max_tokens=5, temperature=0)
    b = client.completions.create(model=model, prompt=SHORT, max_tokens=5, temperature=0)
    assert a.choices[0].text == b.choices[0].text
    r = client.completions.create(model=model, prompt=["one", "two two", "three three three"], max_tokens=3,
                                  extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage.completion_tokens == 9


def test_chat(client, model):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    r = client.chat.completions.create(model=model, messages=msgs, max_tokens=6, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    msg = r.choices[0].message
    assert msg.role == "assistant" and msg.content
    assert r.usage.completion_tokens == 6 and r.choices[0].finish_reason == "length"
    chunks = list(client.chat.completions.create(model=model, messages=msgs, max_tokens=6, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == msg.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_default_max_tokens_fills_the_context(server, client, model):
    # no max_tokens: generate into the room left in the context (kept small here: a long prompt)
    def count(n):
        msgs = [{"role": "user", "content": "word " * n}]
        return httpx.post(server.url + "/tokenize", json={"messages": msgs}).json()["count"]

    n = MAX_MODEL_LEN - 40
    n -= count(n) - (MAX_MODEL_LEN - 12)  # leave ~12 tokens of room
    msgs = [{"role": "user", "content": [{"type": "text", "text": "word " * n}]}]
    r = client.chat.completions.create(model=model, messages=msgs, temperature=0, extra_body={"ignore_eos": True})
    assert 1 <= r.usage.completion_tokens <= 40
    assert r.usage.prompt_tokens + r.usage.completion_tokens == MAX_MODEL_LEN
    assert r.choices[0].finish_reason == "length"


def test_n_choices(client, model):
    r = client.completions.create(model=model, prompt=SHORT, max_tokens=8, n=3, temperature=1.0, seed=5,
                                  extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert r.usage.completion_tokens == 24
    assert len({c.text for c in r.choices}) > 1
    chunks = list(client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=4, n=2, stream=True, extra_body={"ignore_eos": True}))
    finished = {c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason}
    assert finished == {0, 1}


def test_seed_reproducibility(client, model):
    kw = dict(model=model, prompt=SHORT, max_tokens=12, temperature=1.0, extra_body={"ignore_eos": True})
    a = client.completions.create(seed=1234, **kw).choices[0].text
    b = client.completions.create(seed=1234, **kw).choices[0].text
    c = client.completions.create(seed=4321, **kw).choices[0].text
    assert a == b
    assert a != c


def test_stop_string(client, model):
    kw = dict(model=model, prompt=SHORT, max_tokens=16, temperature=1.0, seed=7, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0].text
    assert len(full) >= 8, full
    stop = full[len(full) // 2: len(full) // 2 + 3]
    r = client.completions.create(stop=[stop], **kw).choices[0]
    assert r.finish_reason == "stop"
    assert r.text == full[: full.index(stop)]
    streamed = "".join(c.choices[0].text for c in client.completions.create(stop=stop, stream=True, **kw))
    assert streamed == r.text


def test_logprobs(client, model):
    r = client.completions.create(model=model, prompt=SHORT, max_tokens=5, temperature=0, logprobs=3,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert all(x <= 0 for x in lp.token_logprobs)
    assert all(1 <= len(t) <= 3 for t in lp.top_logprobs)
    if "\ufffd" not in "".join(lp.tokens):  # a token that is part of a UTF-8 character prints as U+FFFD
        assert "".join(lp.tokens) == r.choices[0].text
    # greedy: the chosen token is the most likely one
    assert all(abs(max(t.values()) - x) < 1e-4 for t, x in zip(lp.top_logprobs, lp.token_logprobs))
    c = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                       logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = c.choices[0].logprobs.content
    assert len(content) == 4
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 and t.bytes for t in content)


def test_penalties_and_extensions_accepted(client, model):
    r = client.completions.create(model=model, prompt=SHORT, max_tokens=4, presence_penalty=1.5,
                                  frequency_penalty=0.5, top_p=0.9,
                                  extra_body={"top_k": 20, "min_p": 0.01, "repetition_penalty": 1.2})
    assert r.usage.completion_tokens >= 1


def test_sixteen_concurrent_streams(server, model):
    prompts = [f"Request number {i} says hello" for i in range(16)]
    max_tokens = [8 + i for i in range(16)]

    async def one(http, prompt, n):
        body = {"model": model, "prompt": prompt, "max_tokens": n, "stream": True, "ignore_eos": True,
                "stream_options": {"include_usage": True}}
        text, usage, done = [], None, False
        async with http.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    continue
                obj = json.loads(line[6:])
                if obj["choices"]:
                    text.append(obj["choices"][0]["text"])
                if obj.get("usage"):
                    usage = obj["usage"]
        return done, "".join(text), usage

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            return await asyncio.gather(*(one(http, p, n) for p, n in zip(prompts, max_tokens)))

    results = asyncio.run(main())
    for (done, text, usage), prompt, n in zip(results, prompts, max_tokens):
        assert done and text
        assert usage["completion_tokens"] == n
        assert usage["prompt_tokens"] == num_tokens(server, prompt)


def test_stream_disconnect_frees_kv(server, model):
    before = wait_for(lambda: (s := stats(server))["num_running"] == 0 and s, what="an idle engine")
    body = {"model": model, "prompt": "A long story begins here " * 20, "max_tokens": 800, "stream": True,
            "ignore_eos": True}
    with httpx.Client(base_url=server.url, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json=body) as r:
            got = 0
            for line in r.iter_lines():
                got += line.startswith("data: ")
                if got >= 3:
                    during = stats(server)
                    break
            r.close()  # hang up mid-stream
    assert during["num_running"] == 1
    assert during["kv_blocks_used"][0] > before["kv_blocks_used"][0]
    after = wait_for(lambda: (s := stats(server))["num_running"] == 0 and s, what="the abort")
    assert after["kv_blocks_used"] == before["kv_blocks_used"]
    assert after["num_waiting"] == 0


def test_non_stream_disconnect_frees_kv(server, model):
    before = stats(server)
    body = json.dumps({"model": model, "prompt": "Another long story " * 20, "max_tokens": 900,
                       "ignore_eos": True}).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body)
        wait_for(lambda: stats(server)["num_running"] == 1, what="the request to run")
    after = wait_for(lambda: (s := stats(server))["num_running"] == 0 and s, what="the abort")
    assert after["kv_blocks_used"] == before["kv_blocks_used"]


def metric_samples(server) -> dict:
    text = httpx.get(server.url + "/metrics").text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = s.name + (("{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "model_name")
                             + "}") if len(s.labels) > 1 else "")
            out[key] = s.value
    return out


def test_metrics(server, client, model):
    m0 = metric_samples(server)
    for name in ("csps_time_to_first_token_seconds_count", "csps_inter_token_latency_seconds_count",
                 "csps_e2e_request_latency_seconds_count", "csps_request_queue_time_seconds_count",
                 "csps_num_requests_running", "csps_num_requests_waiting", "csps_kv_blocks_used{rank=0}",
                 "csps_kv_blocks_total{rank=0}", "csps_prefix_cache_hit_rate", "csps_generation_tokens_total",
                 "csps_engine_up"):
        assert name in m0, name
    client.completions.create(model=model, prompt=SHORT, max_tokens=6, extra_body={"ignore_eos": True})
    m1 = metric_samples(server)
    assert m1["csps_generation_tokens_total"] - m0["csps_generation_tokens_total"] == 6
    assert m1["csps_time_to_first_token_seconds_count"] == m0["csps_time_to_first_token_seconds_count"] + 1
    assert m1["csps_inter_token_latency_seconds_count"] == m0["csps_inter_token_latency_seconds_count"] + 5
    assert m1["csps_e2e_request_latency_seconds_count"] == m0["csps_e2e_request_latency_seconds_count"] + 1
    assert m1["csps_request_success_total{finished_reason=length}"] >= 1
    assert m1["csps_engine_steps_total"] > m0["csps_engine_steps_total"]
    assert m1["csps_engine_up"] == 1


def test_prefix_cache_hit_is_reported(client, model):
    prompt = "def function_number_%d(x):\n    return x * 2\n" % 7 * 30
    client.completions.create(model=model, prompt=prompt, max_tokens=2)
    r = client.completions.create(model=model, prompt=prompt, max_tokens=2)
    assert r.usage.prompt_tokens_details.cached_tokens >= r.usage.prompt_tokens - 16


def test_tokenize_detokenize(server):
    t = httpx.post(server.url + "/tokenize", json={"prompt": "Hello world", "return_token_strs": True}).json()
    assert t["count"] == len(t["tokens"]) == 2 and t["max_model_len"] == MAX_MODEL_LEN
    assert "".join(t["token_strs"]) == "Hello world"
    d = httpx.post(server.url + "/detokenize", json={"tokens": t["tokens"]}).json()
    assert d["prompt"] == "Hello world"
    chat = httpx.post(server.url + "/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert chat["count"] > 2
