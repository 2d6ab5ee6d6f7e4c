"""``csps bench serve`` from the command line: prompts of the chosen dataset, the request headers, one
measured run (or a capacity search), the printed metrics and the result files (csps's ``--json``
document; vLLM's layout with ``--save-result``). The load and its measurement are in ``csps.bench.serve``.
"""

from __future__ import annotations

import math
import os

from csps.bench.serve import (
    MAX_MEDIAN_QUEUE_S,
    Prompt,
    ServeTarget,
    find_capacity,
    measure,
    measure_run,
    run_load,
)
from csps.errors import CspsError


def make_prompts(a, tokenizer, rate: float, min_count: int = 0) -> list[Prompt]:
    from dataclasses import replace

    from csps.bench.serve_data import SERVE_DATASETS, dataset_rows
    from csps.bench.workloads import arrival_times, make_workload, workload_config

    n = max(a.num_prompts if a.num_prompts is not None else 100, min_count)
    if a.dataset in SERVE_DATASETS:
        rows = dataset_rows(a, tokenizer, n)
        times = arrival_times(len(rows), rate, a.arrival, a.seed)
        return [Prompt(text, n_in, n_out, t) for (text, n_in, n_out), t in zip(rows, times)]
    cfg = replace(workload_config(a, default_prompts=100), request_rate_per_s=rate, num_prompts=n)
    specs = make_workload(cfg, tokenizer=tokenizer, vocab_size=tokenizer.vocab_size)
    return [Prompt(tokenizer.decode(list(s.prompt_ids)), s.prompt_len, s.output_len, s.arrival_s) for s in specs]


def request_headers(a) -> tuple[tuple[str, str], ...]:
    """``--header K=V`` pairs, then the API key as a bearer token (``--api-key`` or ``$OPENAI_API_KEY``)."""
    headers = [tuple(h) for h in (a.header or [])]
    if a.api_key and not any(k.lower() == "authorization" for k, _ in headers):
        headers.append(("Authorization", f"Bearer {a.api_key}"))
    return tuple(headers)


def served_model(base_url: str, headers=()) -> str:
    import httpx

    try:
        r = httpx.get(base_url.rstrip("/") + "/v1/models", timeout=30, headers=dict(headers))
        r.raise_for_status()
        return r.json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
        raise CspsError(f"cannot list the models of {base_url} ({e}); is the server running? pass --model") from None


def print_metrics(m: dict) -> None:
    keys = ["completed", "failed", "duration_s", "request_throughput", "request_goodput", "output_throughput",
            "total_token_throughput"] + [k for k in m if k.endswith("_ms") and not k.startswith("std_")]
    for k in keys + ["median_queue_s"]:
        if k in m and m[k] is not None:
            v = m[k]
            print(f"  {k:<24} {v:.4g}" if isinstance(v, float) else f"  {k:<24} {v}")


def main_serve(a) -> int:
    from csps.bench.report import default_json_path, document, git_revision, write_json
    from csps.bench.serve_result import default_result_filename, vllm_result
    from csps.engine.tokenizer import Tokenizer, load_tokenizer

    if a.save_result and a.find_capacity:
        raise CspsError("--save-result writes one run; --find-capacity writes its trials with --json")
    git = git_revision()
    headers = request_headers(a)
    target = ServeTarget(a.base_url.rstrip("/"), a.model or served_model(a.base_url, headers), a.endpoint,
                         a.timeout, headers)
    tokenizer = Tokenizer(load_tokenizer(a.tokenizer))
    probe = make_prompts(a, tokenizer, math.inf)[0]
    first, _ = run_load(target, [Prompt(probe.text, probe.prompt_len, 2, 0.0)])
    if not first[0].ok:
        raise CspsError(f"the first test request to {target.base_url}{target.endpoint} failed: {first[0].error}")
    unloaded_ttft = first[0].ttft_s
    if a.num_warmups:
        warm = make_prompts(a, tokenizer, math.inf, a.num_warmups)[:a.num_warmups]
        run_load(target, [Prompt(p.text, p.prompt_len, p.output_len, 0.0) for p in warm], a.max_concurrency)
    slo = {**(a.slo or {}), **{k: v for d in (a.goodput or []) for k, v in d.items()}} or None
    stats = {"percentile_metrics": a.percentile_metrics, "percentiles": a.metric_percentiles}
    common = dict(max_concurrency=a.max_concurrency, slo=slo, unloaded_ttft_s=unloaded_ttft, stats=stats)
    config = {"target": target.describe(), "max_concurrency": a.max_concurrency, "slo": slo,
              "dataset": a.dataset, "num_prompts": a.num_prompts or 100, "prompt_len": a.prompt_len,
              "output_len": a.output_len, "range_ratio": a.range_ratio, "arrival": a.arrival, "seed": a.seed,
              "num_warmups": a.num_warmups, "unloaded_ttft_s": unloaded_ttft}
    if a.find_capacity:
        if not a.slo or "tbt" not in a.slo:
            raise CspsError("--find-capacity needs a TBT SLO, e.g. --slo 'ttft=10s tbt=200ms'")
        start = a.request_rate if math.isfinite(a.request_rate) else 1.0
        # each trial offers load for at least --capacity-duration: a short burst always "fits"
        capacity, trials = find_capacity(
            lambda r: measure(target, make_prompts(a, tokenizer, r, math.ceil(r * a.capacity_duration)), **common),
            a.slo["tbt"], start, a.capacity_steps)
        for t in trials:
            print(f"rate {t['request_rate']:.3g}/s: p99 ITL {t.get('p99_itl_ms') or float('nan'):.1f} ms, median "
                  f"queue {t['median_queue_s'] if t['median_queue_s'] is not None else float('nan'):.2f} s, "
                  f"failed {t['failed']} -> {'meets' if t['meets_slo'] else 'misses'} the SLO")
        print(f"capacity: {capacity if capacity is not None else 'none found'} requests/s "
              f"(p99 TBT <= {a.slo['tbt'] * 1e3:.0f} ms, median queueing <= {MAX_MEDIAN_QUEUE_S:.0f} s)")
        results = {"capacity_requests_per_s": capacity, "trials": trials}
    else:
        m, per_request = measure_run(target, make_prompts(a, tokenizer, a.request_rate),
                                     progress=not a.no_progress, **common)
        m["request_rate"] = a.request_rate
        print_metrics(m)
        results = m
        if a.save_result:
            name = a.result_filename or default_result_filename(target.backend, a.request_rate,
                                                                a.max_concurrency, target.model)
            path = os.path.join(a.result_dir or ".", name)
            write_json(path, vllm_result(per_request, m, backend=target.backend, model_id=target.model,
                                         tokenizer_id=a.tokenizer, request_rate=a.request_rate,
                                         max_concurrency=a.max_concurrency, num_warmups=a.num_warmups))
            print(f"vLLM-format result: {path}")
    path = a.json or default_json_path("serve")
    write_json(path, document("csps bench serve", config, results, git=git))
    print(f"results: {path}")
    return 0
