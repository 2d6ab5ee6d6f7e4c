"""`csps bench serve`: vllm-named metrics against a live server (a minimal in-test OpenAI-compatible streaming
server always; the real `csps serve` with dummy:tiny when it is available), goodput, capacity search."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, StreamingResponse

from csps.bench_serve import (
    Prompt, ServeTarget, _histogram, find_capacity, histogram_quantile, meets_capacity_slo, run_load, serve_metrics)

TOKEN_DELAY_S = 0.01


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fake_openai_app():
    """Streams max_tokens text chunks 10 ms apart, then an empty finishing chunk and a usage chunk
    (the OpenAI wire format); /metrics carries a queue-time histogram like csps serve's."""
    app = FastAPI()
    served = {"n": 0}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}

    @app.get("/metrics")
    async def metrics():
        n = served["n"]
        lines = [f'csps_request_queue_time_seconds_bucket{{le="{le}",model_name="fake"}} {n if le != "0.1" else 0}'
                 for le in ("0.1", "0.5", "+Inf")]
        return PlainTextResponse("\n".join(lines) + f"\ncsps_request_queue_time_seconds_count {n}\n")

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        n, prompt = int(body["max_tokens"]), body["prompt"]
        assert body["stream"] and body["stream_options"]["include_usage"]

        async def events():
            await asyncio.sleep(0.02)
            for i in range(n):
                yield f"data: {json.dumps({'choices': [{'index': 0, 'text': f' t{i}', 'finish_reason': None}]})}\n\n"
                await asyncio.sleep(TOKEN_DELAY_S)
            yield f"data: {json.dumps({'choices': [{'index': 0, 'text': '', 'finish_reason': 'length'}]})}\n\n"
            usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": n, "total_tokens": n}
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"
            served["n"] += 1

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def fake_server():
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(fake_openai_app(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def _check_metrics(m: dict, n: int, output_len: int) -> None:
    assert m["completed"] == n and m["failed"] == 0
    assert m["total_output_tokens"] == n * output_len
    for name in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "p99"):
            assert m[f"{stat}_{name}_ms"] > 0, (stat, name)
    assert m["median_ttft_ms"] <= m["median_e2el_ms"]
    assert m["request_throughput"] > 0 and m["output_throughput"] > 0 and m["total_token_throughput"] > 0


def test_bench_serve_cli_against_a_fake_openai_server(fake_server, tmp_path, capsys):
    from csps.cli import main

    out = tmp_path / "serve.json"
    code = main(["bench", "serve", "--base-url", fake_server, "--num-prompts", "8", "--request-rate", "40",
                 "--prompt-len", "32", "--output-len", "5", "--slo", "ttft=5s tbt=1s", "--json", str(out),
                 "--no-progress"])
    assert code == 0
    assert "median_ttft_ms" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    m = doc["results"]
    _check_metrics(m, 8, 5)
    assert m["request_goodput"] == pytest.approx(m["request_throughput"])  # a lenient SLO: every request is good
    assert m["median_itl_ms"] >= 0.5 * TOKEN_DELAY_S * 1e3  # the server spaces tokens 10 ms apart
    assert m["queue_source"].startswith("server /metrics") and 0.1 <= m["median_queue_s"] <= 0.5
    assert doc["config"]["target"]["model"] == "fake-model" and doc["git"]["revision"]


def test_run_load_with_max_concurrency_and_strict_goodput(fake_server):
    target = ServeTarget(fake_server, "fake-model")
    prompts = [Prompt("a b c", 3, 4, 0.0) for _ in range(6)]
    results, duration = run_load(target, prompts, max_concurrency=2)
    m = serve_metrics(results, duration, slo={"ttft": 1e-6})
    _check_metrics(m, 6, 4)
    assert m["request_goodput"] == 0.0
    assert duration >= 3 * 4 * TOKEN_DELAY_S * 0.9  # at most 2 at a time: three waves
    assert all(r.prompt_len == 3 for r in results)  # the server's usage report wins


def test_failed_requests_are_counted_not_raised():
    target = ServeTarget(f"http://127.0.0.1:{_free_port()}", "nobody", timeout_s=5)
    results, duration = run_load(target, [Prompt("x", 1, 2, 0.0)])
    m = serve_metrics(results, duration)
    assert m["completed"] == 0 and m["failed"] == 1 and m["errors"]


def test_find_capacity_brackets_then_bisects():
    calls = []

    def run_at(rate):  # p99 TBT grows with load: the SLO of 30 ms holds up to 8 requests/s
        calls.append(rate)
        return {"failed": 0, "p99_itl_ms": 10.0 * (1 + rate / 4), "median_queue_s": 0.1}

    capacity, trials = find_capacity(run_at, 0.030, start_rate=1.0, steps=4)
    assert capacity == 8.0 and calls[:5] == [1.0, 2.0, 4.0, 8.0, 16.0] and len(trials) == 9
    capacity, _ = find_capacity(run_at, 0.030, start_rate=64.0, steps=2)
    assert capacity == 8.0
    assert not meets_capacity_slo({"failed": 0, "p99_itl_ms": 10.0, "median_queue_s": 2.5}, 0.1)


def test_histogram_quantile_interpolates_the_run_delta():
    before = _histogram('q_bucket{le="1"} 2\nq_bucket{le="2"} 2\nq_bucket{le="+Inf"} 2\n', "q")
    after = _histogram('q_bucket{le="1"} 2\nq_bucket{le="2"} 6\nq_bucket{le="+Inf"} 6\n', "q")
    assert histogram_quantile(before, after, 0.5) == pytest.approx(1.5)
    assert histogram_quantile(after, after, 0.5) is None


def _csps_serve_available() -> bool:
    try:
        from csps.server.cli import add_serve_parser  # noqa: F401
        from csps.server.testing import ServerProcess  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _csps_serve_available(), reason="csps serve is not available in this checkout")
def test_bench_serve_against_live_csps_serve(tmp_path):
    from csps.cli import main
    from csps.server.testing import ServerProcess

    with ServerProcess(["--model", "dummy:tiny", "--max-model-len", "1024"], timeout_s=240) as srv:
        out = tmp_path / "live.json"
        code = main(["bench", "serve", "--base-url", srv.url, "--num-prompts", "6", "--request-rate", "20",
                     "--prompt-len", "64", "--output-len", "8", "--slo", "ttft=30s tbt=10s", "--json", str(out),
                     "--no-progress"])
        assert code == 0, srv.log
    m = json.loads(out.read_text())["results"]
    _check_metrics(m, 6, 8)
    assert m["median_queue_s"] is not None


def test_which_stream_chunks_count_as_output():
    from csps.bench_serve import _is_token_chunk

    def comp(text, finish=None):
        return {"choices": [{"index": 0, "text": text, "finish_reason": finish}]}

    assert _is_token_chunk(comp(" a"), seen_any=False)
    assert _is_token_chunk(comp(""), seen_any=True)  # a token that decodes to no text still arrived
    assert not _is_token_chunk(comp("", "length"), seen_any=True)  # the closing chunk is not a token
    assert _is_token_chunk(comp("", "length"), seen_any=False)  # ... unless nothing came before it
    assert not _is_token_chunk({"choices": [], "usage": {"completion_tokens": 3}}, seen_any=True)
    role = {"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}
    assert not _is_token_chunk(role, seen_any=False)  # a chat role-only chunk arrives before any token
    assert _is_token_chunk({"choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": None}]}, False)
