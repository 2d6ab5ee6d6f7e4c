"""What operators expect of ``csps serve``, over real HTTP: a server configured only by a YAML file (API key,
one allowed origin, vLLM metric names, JSON logs), CORS, X-Request-Id, the typed OpenAPI, the vLLM names
on /metrics, and ``csps bench serve --api-key`` saving vLLM's result keys against it."""

from __future__ import annotations

import json
import re

import httpx
import pytest
from csps.server.metrics_vllm import NAMES as VLLM_NAMES
from csps.server.testing import ServerProcess
from prometheus_client.parser import text_string_to_metric_families

KEY = "ops-key"
ORIGIN = "https://app.example"
MODEL = "ops-model"  # the served name, not the engine's (dummy:tiny)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cfg = tmp_path_factory.mktemp("cfg") / "serve.yaml"
    cfg.write_text(f"""# everything but the port (ServerProcess passes --port 0) comes from here
model: dummy:tiny
served-model-name: {MODEL}
max_model_len: 512
host: 127.0.0.1
api-key: {KEY}
allowed-origins: [{ORIGIN}]
metrics-compat: vllm
log-format: json
access-log: true
""")
    with ServerProcess(["--config", str(cfg)]) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


def test_the_config_file_set_the_api_key(server, http):
    body = {"prompt": "hi", "max_tokens": 2}
    assert httpx.post(server.url + "/v1/completions", json=body, timeout=30).status_code == 401
    assert http.post("/v1/completions", json=body).status_code == 200


def preflight(url: str, origin: str) -> httpx.Response:
    return httpx.options(url + "/v1/chat/completions", timeout=10, headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})


def test_cors_preflight_allows_the_configured_origin_only(server, http):
    ok = preflight(server.url, ORIGIN)
    assert ok.status_code == 200  # answered without the API key: browsers send none on a preflight
    assert ok.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in ok.headers["access-control-allow-methods"]
    assert "authorization" in ok.headers["access-control-allow-headers"].lower()
    bad = preflight(server.url, "https://evil.example")
    assert bad.status_code == 400 and "access-control-allow-origin" not in bad.headers
    # actual requests: the allowed origin gets the header (and may read X-Request-Id), others do not
    r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1}, headers={"Origin": ORIGIN})
    assert r.headers["access-control-allow-origin"] == ORIGIN
    assert "x-request-id" in r.headers["access-control-expose-headers"].lower()
    r = http.get("/v1/models", headers={"Origin": "https://evil.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_request_id_is_echoed_generated_and_logged(server, http):
    r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}, headers={"X-Request-Id": "trace-42"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "trace-42"
    a, b = http.get("/v1/models"), http.get("/v1/models")
    assert re.fullmatch(r"[0-9a-f]{32}", a.headers["x-request-id"]) and a.headers["x-request-id"] != b.headers[
        "x-request-id"]
    # errors from the middleware (401 here) carry it too; an unusable id (spaces, over 128 characters) is replaced
    r = httpx.get(server.url + "/v1/models", headers={"X-Request-Id": "has space"}, timeout=10)
    assert r.status_code == 401 and re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])
    records = [json.loads(line) for line in server.lines if line.startswith("{")]
    assert records and all({"time", "level", "logger", "message"} <= set(rec) for rec in records)
    mine = [rec for rec in records if rec.get("request_id") == "trace-42"]
    assert mine and "POST /v1/completions" in mine[0]["message"]
    assert any(rec.get("request_id") == a.headers["x-request-id"] for rec in records)


def test_openapi_documents_the_request_bodies(server):
    r = httpx.get(server.url + "/openapi.json", timeout=10)  # open, like /docs, which loads it
    assert r.status_code == 200
    doc = r.json()
    schemas = doc["components"]["schemas"]
    for path, model, field in (("/v1/completions", "CompletionRequest", "prompt"),
                               ("/v1/chat/completions", "ChatCompletionRequest", "messages")):
        op = doc["paths"][path]["post"]
        ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref == f"#/components/schemas/{model}" and op["requestBody"]["required"]
        s = schemas[model]
        assert field in s["required"] and s["additionalProperties"] is False
        assert s["properties"]["temperature"]["anyOf"][0] == {"type": "number", "minimum": 0.0, "maximum": 2.0}
        assert {"200", "400", "401", "429", "503"} <= set(op["responses"]) and "422" not in op["responses"]
        assert "text/event-stream" in op["responses"]["200"]["content"]
        assert op["security"] == [{"bearer": []}]
    # the engine's limits: the one served model name, the context length, the vocabulary
    comp = schemas["CompletionRequest"]["properties"]
    assert comp["model"]["anyOf"][0]["enum"] == [MODEL]
    assert comp["max_tokens"]["anyOf"][0]["maximum"] == 511
    assert schemas["ChatMessage"]["properties"]["role"]["enum"][0] == "system"
    assert "security" not in doc["paths"]["/health"]["get"]
    assert httpx.get(server.url + "/docs", timeout=10).status_code == 200


def test_vllm_metric_names_beside_csps_names(server, http):
    r = http.post("/v1/completions", json={"prompt": "count tokens", "max_tokens": 5, "ignore_eos": True})
    assert r.status_code == 200
    text = httpx.get(server.url + "/metrics", timeout=10).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in VLLM_NAMES:
        assert name in families, name

    def value(family: str, sample: str, **labels) -> float:
        return sum(s.value for s in families[family].samples
                   if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()))

    # the same quantities under both names (no requests are in flight between the two reads)
    assert value("vllm:generation_tokens", "vllm:generation_tokens_total") == value(
        "csps_generation_tokens", "csps_generation_tokens_total") >= 5
    assert value("vllm:request_success", "vllm:request_success_total", finished_reason="length") == value(
        "csps_request_success", "csps_request_success_total", finished_reason="length") >= 1
    assert value("vllm:time_to_first_token_seconds", "vllm:time_to_first_token_seconds_count") == value(
        "csps_time_to_first_token_seconds", "csps_time_to_first_token_seconds_count") >= 1
    assert value("vllm:prefix_cache_queries", "vllm:prefix_cache_queries_total") == value(
        "csps_prompt_tokens", "csps_prompt_tokens_total")
    assert 0.0 <= value("vllm:kv_cache_usage_perc", "vllm:kv_cache_usage_perc") <= 1.0
    assert families["vllm:num_requests_running"].samples[0].labels == {"model_name": MODEL}


def test_bench_serve_with_api_key_saves_vllm_result_keys(server, tmp_path, monkeypatch):
    from csps.cli import main

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)

    base = ["bench", "serve", "--base-url", server.url, "--num-prompts", "4", "--request-rate", "inf",
            "--prompt-len", "32", "--output-len", "4", "--no-progress", "--json", str(tmp_path / "csps.json")]
    code = main(base + ["--api-key", KEY, "--save-result", "--result-dir", str(tmp_path / "res"),
                        "--result-filename", "run.json", "--goodput", "ttft:60000", "tpot:60000",
                        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
                        "--num-warmups", "1"])
    assert code == 0
    res = json.loads((tmp_path / "res" / "run.json").read_text())
    for key in ("duration", "completed", "failed", "total_input_tokens", "total_output_tokens", "request_throughput",
                "request_goodput", "output_throughput", "total_token_throughput", "mean_ttft_ms", "median_ttft_ms",
                "std_ttft_ms", "p99_ttft_ms", "p50_tpot_ms", "p99_itl_ms", "mean_e2el_ms", "input_lens",
                "output_lens", "ttfts", "itls", "model_id", "backend", "num_prompts", "max_concurrency"):
        assert key in res, key
    assert res["completed"] == 4 and res["failed"] == 0 and res["total_output_tokens"] == 16
    assert res["model_id"] == MODEL and res["backend"] == "openai" and len(res["itls"]) == 4
    assert res["request_goodput"] == pytest.approx(res["request_throughput"])  # lenient SLOs: all good
    assert 0 < res["p50_tpot_ms"] <= res["p99_tpot_ms"] and res["duration"] > 0
    assert KEY not in (tmp_path / "csps.json").read_text()  # the key is not written into results
    # without the key the server refuses, and the first request says so
    assert main(base) == 2


@pytest.mark.parametrize("path,body,status", [
    # what the schema says, the validators do: integral JSON numbers are integers ...
    ("/v1/completions", {"prompt": [1, 2.0], "max_tokens": 2.0, "seed": 1e1}, 200),
    # ... no coercion from strings or numbers to booleans, none of the unsupported values
    ("/v1/completions", {"prompt": "hi", "max_tokens": "2"}, 400),
    ("/v1/completions", {"prompt": "hi", "echo": 0}, 400),
    ("/v1/completions", {"prompt": "hi", "best_of": 2, "n": 2}, 400),
    ("/v1/completions", {"prompt": "hi", "best_of": 1, "max_tokens": 1}, 200),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "parallel_tool_calls": 0}, 400),
    ("/tokenize", {"messages": []}, 400),  # was a 500 from the chat template
    ("/tokenize", {"prompt": "hi", "messages": None}, 200),
])
def test_validation_matches_the_schema(http, path, body, status):
    r = http.post(path, json=body)
    assert r.status_code == status, r.text


def test_405_lists_the_allowed_methods(http):
    r = http.put("/v1/completions", json={})
    assert r.status_code == 405 and r.headers["allow"] == "POST" and r.json()["error"]["message"]


def test_summarize_max_tokens_that_leaves_no_room_is_refused_at_once(server, http):
    top = httpx.get(server.url + "/openapi.json", timeout=10).json()[
        "components"]["schemas"]["SummarizeRequest"]["properties"]["max_tokens"]["maximum"]
    assert 1 <= top < 512 - 8  # the default instructions and the margin take their share of the context
    r = http.post("/v1/summarize", json={"text": "word " * 50, "max_tokens": top + 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"  # not map-reduce, then a 500
    assert "leave no room" in r.json()["error"]["message"]
