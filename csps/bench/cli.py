"""``csps bench`` (real engine, ``--simulate``, ``--validate``) and ``csps bench serve``: arguments only.

The work happens in ``csps.bench.run`` (real runs), ``csps.bench.validate``, ``csps.bench.simulator`` (GPU clusters on a
virtual clock) and ``csps.bench.serve`` (online load against an OpenAI-compatible server).
"""

from __future__ import annotations

import argparse
import math
import os
import re

from csps.bench.serve_data import SERVE_DATASETS
from csps.bench.workloads import ARRIVALS, DATASETS
from csps.cli_args import parse_len
from csps.perf.hardware import PROFILE_NAMES


def parse_seconds(text: str) -> float:
    """Durations: '600', '600s', '10m', '1h', '250ms'."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*(ms|s|m|min|h)?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (examples: 600, 90s, 10m, 250ms)")
    scale = {"ms": 1e-3, "s": 1.0, None: 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}[m.group(2)]
    value = float(m.group(1)) * scale
    if value <= 0:
        raise argparse.ArgumentTypeError(f"duration must be positive: {text!r}")
    return value


def parse_rate(text: str) -> float:
    if text.strip().lower() in ("inf", "infinite", "max"):
        return math.inf
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a rate: {text!r} (requests/s, or inf)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"rate must be positive: {text!r}")
    return value


def parse_slo(text: str) -> dict[str, float]:
    """'ttft=2s tbt=100ms' or 'ttft=2,tbt=0.1' (seconds by default) -> {'ttft': 2.0, 'tbt': 0.1}."""
    out = {}
    for part in re.split(r"[,\s]+", text.strip()):
        if not part:
            continue
        key, _, value = part.partition("=")
        key = key.strip().lower()
        if key not in ("ttft", "tbt") or not value:
            raise argparse.ArgumentTypeError(f"bad SLO {part!r} (expected ttft=SECONDS and/or tbt=SECONDS)")
        out[key] = parse_seconds(value)
    if not out:
        raise argparse.ArgumentTypeError("empty SLO (expected ttft=... tbt=...)")
    return out


def parse_goodput(text: str) -> dict[str, float]:
    """vLLM's goodput SLO: 'ttft:500 tpot:50 e2el:2000' (milliseconds) -> seconds by metric."""
    out = {}
    for part in re.split(r"[,\s]+", text.strip()):
        key, _, value = part.partition(":")
        try:
            ms = float(value)
        except ValueError:
            ms = -1.0
        if key not in ("ttft", "tpot", "e2el") or ms < 0:
            raise argparse.ArgumentTypeError(f"bad goodput SLO {part!r} (expected ttft:MS, tpot:MS or e2el:MS)")
        out[key] = ms / 1e3
    return out


def parse_header(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"bad header {text!r} (expected KEY=VALUE)")
    return key.strip(), value


def parse_metric_names(text: str) -> tuple[str, ...]:
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [x for x in names if x not in ("ttft", "tpot", "itl", "e2el")]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"bad percentile metrics {text!r} (comma-separated: ttft,tpot,itl,e2el)")
    return names


def parse_percentiles(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        values = ()
    if not values or not all(0 < v < 100 for v in values):
        raise argparse.ArgumentTypeError(f"bad percentiles {text!r} (comma-separated, e.g. 25,50,99)")
    return values


def _add_workload_args(p: argparse.ArgumentParser, prompt_default: int, output_default: int,
                       datasets: tuple[str, ...] = DATASETS) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--dataset", "--dataset-name", dest="dataset", default="random", choices=datasets,
                   help="random token ids | books (../shared/data/books or --dataset-path) | code (Python stdlib)"
                        + (" | sharegpt (--dataset-path FILE.json) | prefix_repetition" if datasets != DATASETS
                           else ""))
    g.add_argument("--dataset-path", default=None, help="books: a .txt file or a folder of them; sharegpt: the JSON")
    g.add_argument("--prompt-len", "--input-len", "--random-input-len", dest="prompt_len", type=parse_len,
                   default=prompt_default, help="prompt tokens per request (k/M suffixes)")
    g.add_argument("--output-len", "--random-output-len", dest="output_len", type=parse_len,
                   default=output_default, help="generated tokens per request")
    g.add_argument("--num-prompts", "--batch", dest="num_prompts", type=int, default=None,
                   help="number of requests")
    g.add_argument("--range-ratio", "--random-range-ratio", dest="range_ratio", type=float, default=0.0,
                   help="lengths uniform in [L(1-r), L(1+r)]")
    g.add_argument("--request-rate", type=parse_rate, default=math.inf, help="requests/s (inf: all at once)")
    g.add_argument("--arrival", default="poisson", choices=ARRIVALS, help="arrival process at --request-rate")
    g.add_argument("--long-prompt-len", type=parse_len, default=None,
                   help="add one long prompt arriving among the others (tag 'long')")
    g.add_argument("--long-output-len", type=parse_len, default=16)
    g.add_argument("--long-arrival", type=parse_seconds, default=1.0, help="when the long prompt arrives")
    g.add_argument("--json", default=None, help="write results here (default: csps-bench-<kind>-<time>.json)")


def add_bench_parser(sub, add_engine_args) -> None:
    p = sub.add_parser("bench", help="measure the real engine, or simulate GPU clusters with the cost model",
                       description="Real runs by default; --simulate predicts GPU clusters; --validate checks "
                                   "the cost model against this machine; `csps bench serve` loads a server.")
    add_engine_args(p)
    # None: chosen later (bench.auto_token_budget; --validate runs dummy:tiny unless --model is given)
    p.set_defaults(token_budget=None, model=None)
    _add_workload_args(p, prompt_default=1024, output_default=64)
    g = p.add_argument_group("bench")
    g.add_argument("--compare-policies", action="store_true",
                   help="run stall-free and prefill-first side by side on the same workload")
    g.add_argument("--compare-chunking", action="store_true",
                   help="run stall-free batching with prefill chunks sized to the step time budget "
                        "(--step-time-budget-ms, auto unless a number is given) and to the token budget alone, "
                        "side by side on the same workload")
    g.add_argument("--long-baselines", action="store_true",
                   help="with --long-prompt-len: also run the same requests without the long prompt and the long "
                        "prompt alone, and report p99 TBT with/without it and its TTFT with the others/alone")
    g.add_argument("--plot", default=None, metavar="FILE.png", help="draw the step timeline")
    g.add_argument("--plot-tbt", default=None, metavar="FILE.png",
                   help="draw every generated token's gap (TBT) against its time, one panel per run, the long "
                        "prompt's arrival and first token marked")
    g.add_argument("--max-time", type=parse_seconds, default=600.0,
                   help="refuse runs the cost model predicts to take longer (default 10m)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--wait-quiet", type=parse_seconds, default=0.0, metavar="SECONDS",
                   help="before each measured run, wait up to this long for other jobs to leave the CPU")
    g.add_argument("--reprobe", action="store_true",
                   help="measure this machine's profile again (the cached probe may date from a busy moment)")
    s = p.add_argument_group("simulation")
    s.add_argument("--simulate", action="store_true", help="predict with the cost model instead of running")
    s.add_argument("--hardware", default="h100", choices=PROFILE_NAMES, help="hardware profile to simulate")
    s.add_argument("--gpus", type=int, default=8, help="devices to simulate")
    s.add_argument("--strategies", default=None,
                   help="comma-separated strategy name prefixes (default: all; e.g. sarathi,csps-sp8-passkv)")
    v = p.add_argument_group("validation")
    v.add_argument("--validate", action="store_true",
                   help="calibrate the cost model on this machine and report its error on real runs")
    v.add_argument("--validate-lengths", default="1k,2k,4k,8k,16k", help="prompt lengths to predict")
    v.add_argument("--validate-batches", default="1,8,32", help="decode batch sizes to predict")
    v.add_argument("--validate-repeats", type=int, default=3, help="runs per case; the fastest counts")
    p.set_defaults(func=cmd_bench)

    bsub = p.add_subparsers(dest="bench_command", required=False, metavar="{serve}")
    s = bsub.add_parser("serve", help="online load against an OpenAI-compatible server (vllm bench serve metrics)")
    s.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server (csps serve or any OpenAI API)")
    s.add_argument("--endpoint", default="/v1/completions", choices=["/v1/completions", "/v1/chat/completions"])
    s.add_argument("--model", default=None, help="served model name (default: the first of /v1/models)")
    s.add_argument("--tokenizer", default="smollm2", help="tokenizer for building prompts of a given length")
    s.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                   help="sent as 'Authorization: Bearer <key>' (default: $OPENAI_API_KEY)")
    s.add_argument("--header", type=parse_header, action="append", metavar="KEY=VALUE",
                   help="an extra HTTP header on every request (repeatable)")
    _add_workload_args(s, prompt_default=512, output_default=64, datasets=DATASETS + SERVE_DATASETS)
    d = s.add_argument_group("vLLM datasets")
    d.add_argument("--sharegpt-output-len", type=int, default=None,
                   help="sharegpt: output tokens per request (default: the length of the reply in the data)")
    d.add_argument("--prefix-repetition-prefix-len", type=int, default=256)
    d.add_argument("--prefix-repetition-suffix-len", type=int, default=256)
    d.add_argument("--prefix-repetition-num-prefixes", type=int, default=10)
    d.add_argument("--prefix-repetition-output-len", type=int, default=128)
    s.add_argument("--max-concurrency", type=int, default=None, help="at most this many requests in flight")
    s.add_argument("--slo", type=parse_slo, default=None, help="e.g. 'ttft=2s tbt=100ms': goodput and capacity")
    s.add_argument("--goodput", type=parse_goodput, nargs="+", default=None, metavar="KEY:MS",
                   help="vLLM's goodput SLOs in ms, e.g. ttft:500 tpot:50 e2el:2000")
    s.add_argument("--percentile-metrics", type=parse_metric_names, default=("ttft", "tpot", "itl", "e2el"),
                   help="comma-separated metrics with mean/median/std/percentiles (ttft,tpot,itl,e2el)")
    s.add_argument("--metric-percentiles", type=parse_percentiles, default=(90.0, 99.0),
                   help="comma-separated percentiles reported for them (default 90,99)")
    s.add_argument("--num-warmups", type=int, default=0, help="requests sent (and not measured) before the run")
    r = s.add_argument_group("vLLM result file")
    r.add_argument("--save-result", action="store_true", help="write vllm bench serve's result JSON")
    r.add_argument("--result-dir", default=None, help="folder of the result file (default: the current one)")
    r.add_argument("--result-filename", default=None,
                   help="default: <backend>-<rate>qps[-concurrency<n>]-<model>-<date>.json, as vLLM names it")
    s.add_argument("--find-capacity", action="store_true",
                   help="highest rate with p99 TBT under the SLO and median queueing delay <= 2 s")
    s.add_argument("--capacity-steps", type=int, default=4, help="bisection steps after bracketing")
    s.add_argument("--capacity-duration", type=parse_seconds, default=30.0,
                   help="each capacity trial sends requests for at least this long")
    s.add_argument("--timeout", type=parse_seconds, default=600.0, help="per-request timeout")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_bench)


def cmd_bench(a: argparse.Namespace) -> int:
    if getattr(a, "bench_command", None) == "serve":
        from csps.bench.serve_main import main_serve

        return main_serve(a)
    from csps.bench import run as bench

    if a.model is None:
        a.model = "dummy:tiny" if a.validate else "smollm2"
    if a.reprobe:
        from csps.device import resolve_dtype
        from csps.perf.hardware import load_or_probe

        load_or_probe(dtype_bytes=2 if resolve_dtype(a.dtype) == "bfloat16" else 4, refresh=True)
    if a.validate:
        from csps.bench.validate import main_validate

        return main_validate(a)
    if a.simulate:
        from csps.bench.simulate_main import main_simulate

        return main_simulate(a)
    return bench.main_real(a)
