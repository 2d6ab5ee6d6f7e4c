"""``csps serve --sp 2``: the engine process is rank 0 of two ranks; the API is the same."""

import time

import httpx
import pytest
from csps.server.testing import ServerProcess
from prometheus_client.parser import text_string_to_metric_families


@pytest.fixture(scope="module")
def server():
    args = ["--model", "dummy:tiny", "--max-model-len", "2048", "--sp", "2", "--sp-threshold", "64"]
    with ServerProcess(args) as srv:
        yield srv


def stats(server) -> dict:
    return httpx.get(server.url + "/stats", timeout=30).json()["stats"]


def test_layout_is_logged_and_sequence_parallel_requests_complete(server):
    assert "layout sp=2 x tp=1" in server.log
    body = {"prompt": "hello world " * 100, "max_tokens": 8, "ignore_eos": True}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
    s = stats(server)
    assert len(s["kv_blocks_used"]) == len(s["kv_blocks_total"]) == 2
    kinds = set()
    for fam in text_string_to_metric_families(httpx.get(server.url + "/metrics").text):
        for sample in fam.samples:
            if sample.name == "csps_engine_step_bytes_sum" and sample.value > 0:
                kinds.add(sample.labels["kind"])
    assert "pass_kv" in kinds or "pass_q" in kinds  # bytes moved between ranks, by kind


def test_disconnect_frees_kv_on_every_rank(server):
    before = stats(server)
    body = {"prompt": "a long prompt " * 60, "max_tokens": 1500, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as r:
        n = 0
        for line in r.iter_lines():
            n += line.startswith("data: ")
            if n >= 3:
                during = stats(server)
                break
        r.close()  # hang up mid-stream
    assert during["num_running"] == 1
    assert all(d > b for d, b in zip(during["kv_blocks_used"], before["kv_blocks_used"]))  # KV on both ranks
    deadline = time.monotonic() + 30
    while (s := stats(server))["num_running"] or s["kv_blocks_used"] != before["kv_blocks_used"]:
        assert time.monotonic() < deadline, f"KV not freed: {s} vs {before}"
        time.sleep(0.05)
