"""Device choices (csps.device) and the CUDA entry points' behaviour on a machine without CUDA."""

import os
import subprocess
import sys
import time

import pytest
import torch

from csps.config import EngineConfig
from csps.device import (
    check_ranks_per_node,
    distributed_backend,
    rank_device,
    resolve_device,
    resolve_dtype,
)
from csps.errors import CspsError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")


def test_device_resolution_and_backends():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(CspsError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    assert rank_device("cuda", 3) == torch.device("cuda", 3) and rank_device("cpu", 3) == torch.device("cpu")
    assert distributed_backend("cuda") == "nccl" and distributed_backend("cpu") == "gloo"
    assert distributed_backend("cuda", "gloo") == "gloo"
    assert resolve_dtype("auto", "cuda") == "bfloat16" and resolve_dtype("float32", "cuda") == "float32"


def test_more_ranks_than_gpus_is_refused():
    with pytest.raises(CspsError, match="8 ranks on this node but only 2 GPU"):
        check_ranks_per_node("cuda", 8, num_gpus=2)
    check_ranks_per_node("cuda", 2, num_gpus=2)
    check_ranks_per_node("cpu", 64, num_gpus=0)  # CPU ranks share cores


@no_cuda
def test_device_cuda_without_cuda_is_one_clear_error():
    with pytest.raises(CspsError, match="no CUDA device is available"):
        EngineConfig(model="dummy:tiny", device="cuda")
    res = subprocess.run([sys.executable, "-m", "csps.cli", "generate", "--device", "cuda", "--model", "dummy:tiny",
                          "hello"], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--device cuda" in lines[0] and "use --device cpu" in lines[0], res.stderr


@no_cuda
def test_gpu_check_says_so_at_once_without_cuda():
    t = time.perf_counter()
    res = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py")], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 1 and res.stdout == "" and time.perf_counter() - t < 60
    assert res.stderr.strip().count("\n") == 0 and "no CUDA device" in res.stderr


def test_gpu_check_dry_run_on_the_cpu(tmp_path):
    # the script's own code (weights on a device, greedy against transformers, TTFT, decode, predictions),
    # with tiny shapes on the CPU
    out = tmp_path / "gc.json"
    res = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--device", "cpu",
                          "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    import json

    doc = json.loads(out.read_text())
    assert doc["greedy"]["tiny"]["pass"] and doc["greedy"]["tiny"]["prompts"] == 3
    assert [r["tokens"] for r in doc["ttft"]] == [512, 2048] and all(r["predicted_s"] > 0 for r in doc["ttft"])
    assert [r["batch"] for r in doc["decode"]] == [1, 32] and all(r["steps"] > 0 for r in doc["decode"])
    assert "skipped" in doc["sp2"]


def test_token_budget_defaults_by_device():
    from csps.device import default_token_budget
    from csps.llm import make_engine_config

    assert default_token_budget("cpu") == 1024 and default_token_budget("cuda") == 512
    assert default_token_budget("cuda:1") == 512
    assert make_engine_config(device="cpu").scheduler.token_budget == 1024
    assert make_engine_config(device="cpu", token_budget=256).scheduler.token_budget == 256  # given: kept
