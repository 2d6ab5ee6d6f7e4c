"""Starting (503), engine death (detected, reported, no hang), SIGTERM (drain, then exit), bad startup."""

import json
import os
import signal
import subprocess
import sys
import threading

import httpx
from csps.server.testing import ServerProcess

TINY = ["--model", "dummy:tiny", "--max-model-len", "512"]


def read_stream(lines) -> tuple[list[str], list[dict], bool]:
    texts, errors, done = [], [], False
    for line in lines:
        if line == "data: [DONE]":
            done = True
        elif line.startswith("data: "):
            obj = json.loads(line[6:])
            if "error" in obj:
                errors.append(obj["error"])
            else:
                texts.extend(c["text"] for c in obj["choices"])
    return texts, errors, done


def test_503_while_starting_then_ready():
    with ServerProcess(TINY, wait_ready=False) as srv:
        h = httpx.get(srv.url + "/health", timeout=10)
        # the API answers at once; the engine process needs seconds to import torch and load
        assert h.status_code == 503 and h.json()["status"] == "starting"
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=10)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_starting"
        assert "Retry-After" in r.headers
        srv.wait_until_ready()
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
        assert r.status_code == 200


def test_engine_death_is_detected_and_reported():
    with ServerProcess(TINY) as srv:
        pid = httpx.get(srv.url + "/health").json()["engine_pid"]
        body = {"prompt": "tell me", "max_tokens": 400, "stream": True, "ignore_eos": True}
        with httpx.Client(base_url=srv.url, timeout=30) as http:
            with http.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                it = r.iter_lines()
                next(line for line in it if line.startswith("data: "))
                os.kill(pid, signal.SIGKILL)
                texts, errors, done = read_stream(it)  # must end, not hang
            assert errors and errors[0]["code"] == "engine_dead" and done
            h = http.get("/health")
            assert h.status_code == 503
            assert h.json()["status"] == "dead" and "exited" in h.json()["reason"]
            r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
            assert r.status_code == 503 and "engine died" in r.json()["error"]["message"]
            m = http.get("/metrics")
            assert m.status_code == 200 and 'csps_engine_up{model_name="dummy:tiny"} 0.0' in m.text


def test_sigterm_drains_in_flight_requests():
    srv = ServerProcess(TINY).start()
    try:
        body = {"prompt": "tell me", "max_tokens": 60, "stream": True, "ignore_eos": True,
                "stream_options": {"include_usage": True}}
        result = {}
        started = threading.Event()

        def client():
            with httpx.Client(base_url=srv.url, timeout=60) as http:
                with http.stream("POST", "/v1/completions", json=body) as r:
                    lines = []
                    for line in r.iter_lines():
                        lines.append(line)
                        started.set()
                    result["lines"] = lines

        t = threading.Thread(target=client)
        t.start()
        assert started.wait(30)
        srv.signal(signal.SIGTERM)
        t.join(60)
        assert srv.wait(60) == 0
        lines = [x for x in result["lines"] if x.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        usage = json.loads(lines[-2][6:])["usage"]
        assert usage["completion_tokens"] == 60
        assert "draining in-flight requests" in srv.log
    finally:
        srv.stop()


def test_bad_engine_settings_exit_with_a_clear_error():
    cmd = [sys.executable, "-m", "csps.cli", "serve", "--port", "0", "--model", "dummy:no-such-preset"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "the engine failed to start" in p.stderr and "no-such-preset" in p.stderr
    assert "Traceback" not in p.stderr
