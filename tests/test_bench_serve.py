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

from csps.bench.serve import (
    Prompt,
    ServeTarget,
    _histogram,
    find_capacity,
    histogram_quantile,
    meets_capacity_slo,
    run_load,
    serve_metrics,
)

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
    app.state.headers = []  # the headers of every completion request

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
        app.state.headers.append(dict(request.headers))
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
    app = fake_openai_app()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    yield f"http://127.0.0.1:{port}", app
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


@pytest.fixture(scope="module")
def fake_url(fake_server):
    return fake_server[0]


def test_bench_serve_cli_against_a_fake_openai_server(fake_url, tmp_path, capsys):
    from csps.cli import main

    out = tmp_path / "serve.json"
    code = main(["bench", "serve", "--base-url", fake_url, "--num-prompts", "8", "--request-rate", "40",
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


def test_run_load_with_max_concurrency_and_strict_goodput(fake_url):
    target = ServeTarget(fake_url, "fake-model")
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
    from csps.server.testing import ServerProcess

    from csps.cli import main

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
    from csps.bench.serve import _is_token_chunk

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


def _bench(url: str, tmp_path, *extra: str) -> int:
    from csps.cli import main

    return main(["bench", "serve", "--base-url", url, "--request-rate", "inf", "--output-len", "3", "--no-progress",
                 "--json", str(tmp_path / "csps.json"), *extra])


def test_headers_api_key_env_and_vllm_result_file(fake_server, tmp_path, monkeypatch):
    url, app = fake_server
    monkeypatch.setenv("OPENAI_API_KEY", "from-env")
    app.state.headers.clear()
    code = _bench(url, tmp_path, "--num-prompts", "3", "--prompt-len", "16", "--header", "X-Team=search",
                  "--header", "X-Empty=", "--num-warmups", "2", "--save-result", "--result-dir", str(tmp_path),
                  "--percentile-metrics", "ttft,itl", "--metric-percentiles", "25,99.9", "--goodput", "ttft:0.001")
    assert code == 0
    seen = app.state.headers
    assert len(seen) == 1 + 2 + 3  # the probe, the warmups, the run
    assert all(h["authorization"] == "Bearer from-env" and h["x-team"] == "search" and h["x-empty"] == ""
               for h in seen)
    [path] = tmp_path.glob("openai-infqps-fake-model-*.json")  # vLLM's default file name
    res = json.loads(path.read_text())
    assert res["completed"] == 3 and res["num_warmups"] == 2 and res["request_rate"] == "inf"
    assert {"p25_ttft_ms", "p99.9_ttft_ms", "std_itl_ms", "p25_itl_ms"} <= set(res)
    assert "mean_tpot_ms" not in res and "mean_e2el_ms" not in res  # only the percentile metrics asked for
    assert res["request_goodput"] == 0.0  # no TTFT is under 1 microsecond
    assert res["generated_texts"][0] == " t0 t1 t2" and res["output_lens"] == [3, 3, 3]
    assert "from-env" not in (tmp_path / "csps.json").read_text()


def test_sharegpt_file_and_prefix_repetition(fake_server, tmp_path, smollm2_tokenizer):
    from argparse import Namespace

    from csps.bench.serve_data import dataset_rows

    url, app = fake_server
    long_reply = "word " * 40
    convs = [{"conversations": [{"from": "human", "value": f"question number {i} about the sea"},
                                {"from": "gpt", "value": long_reply}]} for i in range(5)]
    convs += [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": long_reply}]},  # < 4
              {"conversations": [{"from": "human", "value": "only one turn"}]}, {"id": "no conversations"}]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(convs))
    a = Namespace(dataset="sharegpt", dataset_path=str(path), sharegpt_output_len=None, seed=0)
    rows = dataset_rows(a, smollm2_tokenizer, 10)
    assert len(rows) == 5 and all(text.startswith("question number") for text, _, _ in rows)
    assert all(n_in == len(smollm2_tokenizer.encode(t)) and n_out == len(smollm2_tokenizer.encode(long_reply))
               for t, n_in, n_out in rows)
    a = Namespace(dataset="prefix_repetition", prefix_repetition_prefix_len=32, prefix_repetition_suffix_len=8,
                  prefix_repetition_num_prefixes=2, prefix_repetition_output_len=5, seed=1)
    rows = dataset_rows(a, smollm2_tokenizer, 6)
    texts = [t for t, _, _ in rows]
    assert texts[0] != texts[2] and len(set(texts)) == 6 and all(n == 5 for _, _, n in rows)
    prefix_len = len(smollm2_tokenizer.decode(smollm2_tokenizer.encode(texts[0])[:20]))
    assert texts[0][:prefix_len] == texts[2][:prefix_len] != texts[1][:prefix_len]  # prefixes 0, 1, 0, 1, ...
    app.state.headers.clear()
    assert _bench(url, tmp_path, "--dataset-name", "sharegpt", "--dataset-path", str(path), "--num-prompts", "3",
                  "--sharegpt-output-len", "4") == 0
    assert json.loads((tmp_path / "csps.json").read_text())["results"]["total_output_tokens"] == 12
    assert _bench(url, tmp_path, "--dataset", "prefix_repetition", "--num-prompts", "4",
                  "--prefix-repetition-prefix-len", "16", "--prefix-repetition-suffix-len", "4",
                  "--prefix-repetition-output-len", "2") == 0
    assert json.loads((tmp_path / "csps.json").read_text())["results"]["total_output_tokens"] == 8


@pytest.mark.parametrize("argv", [["--goodput", "ttft=5"], ["--goodput", "itl:5"], ["--header", "novalue"],
                                  ["--percentile-metrics", "ttft,latency"], ["--metric-percentiles", "0,100"]])
def test_bad_vllm_style_arguments_are_refused(argv):
    from csps.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "serve", *argv])
