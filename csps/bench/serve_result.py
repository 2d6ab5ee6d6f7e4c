"""The metrics of one ``csps bench serve`` run, named as ``vllm bench serve`` names them, and the result
file of ``--save-result`` in vLLM's layout (``duration``, ``mean_ttft_ms``, ``p99_itl_ms``, ``ttfts``, ...).

Percentile metrics (``--percentile-metrics``) are any of ttft, tpot, itl, e2el; each gets mean, median,
std (population, numpy's default) and the ``--metric-percentiles`` (``p99_ttft_ms``). Goodput counts the
requests whose TTFT, TPOT and E2EL all meet the SLO given for them (``--goodput ttft:MS tpot:MS e2el:MS``).
"""

from __future__ import annotations

import math
import statistics
import time

from csps.bench.report import percentile

METRICS = ("ttft", "tpot", "itl", "e2el")
GOODPUT_KEYS = ("ttft", "tpot", "e2el")


def percentile_key(p: float) -> str:
    return f"p{int(p) if float(p).is_integer() else p}"


def ms_stats(name: str, values: list[float], percentiles=(90, 99)) -> dict:
    out = {f"mean_{name}_ms": 1e3 * statistics.fmean(values) if values else None,
           f"median_{name}_ms": None if not values else 1e3 * percentile(values, 50),
           f"std_{name}_ms": 1e3 * statistics.pstdev(values) if values else None}
    for p in percentiles:
        v = percentile(values, p)
        out[f"{percentile_key(p)}_{name}_ms"] = None if v is None else 1e3 * v
    return out


def is_good(r, slo: dict[str, float]) -> bool:
    """Within every SLO given (seconds): ttft, tpot (``tbt`` is the same), e2el."""
    tpot = slo.get("tpot", slo.get("tbt", math.inf))
    return (r.ttft_s <= slo.get("ttft", math.inf) and (r.tpot_s is None or r.tpot_s <= tpot)
            and r.e2el_s <= slo.get("e2el", math.inf))


def serve_metrics(results: list, duration_s: float, slo: dict[str, float] | None = None,
                  percentile_metrics=METRICS, percentiles=(90, 99)) -> dict:
    """vllm-bench-serve-named metrics of one run (``results``: ``bench_serve.RequestResult``)."""
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    per_s = (lambda x: x / duration_s) if duration_s > 0 else (lambda x: None)
    m = {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration_s,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": per_s(len(ok)),
        "output_throughput": per_s(out_tokens),
        "total_token_throughput": per_s(in_tokens + out_tokens),
    }
    values = {"ttft": [r.ttft_s for r in ok], "tpot": [r.tpot_s for r in ok if r.tpot_s is not None],
              "itl": [x for r in ok for x in r.itl_s], "e2el": [r.e2el_s for r in ok]}
    for name in percentile_metrics:
        m.update(ms_stats(name, values[name], percentiles))
    if slo:
        m["request_goodput"] = per_s(sum(1 for r in ok if is_good(r, slo)))
        m["slo"] = dict(slo)
    errors = sorted({r.error for r in results if not r.ok})
    if errors:
        m["errors"] = errors[:5]
    return m


def vllm_result(results: list, metrics: dict, *, backend: str, model_id: str, tokenizer_id: str,
                request_rate: float, max_concurrency: int | None, num_warmups: int) -> dict:
    """``vllm bench serve --save-result``'s JSON: the run's settings, its metrics, and per-request lists."""
    doc = {"date": time.strftime("%Y%m%d-%H%M%S"), "endpoint_type": backend, "backend": backend, "label": None,
           "model_id": model_id, "tokenizer_id": tokenizer_id, "num_prompts": len(results),
           "request_rate": "inf" if math.isinf(request_rate) else request_rate, "burstiness": 1.0,
           "max_concurrency": max_concurrency, "num_warmups": num_warmups, "duration": metrics["duration_s"]}
    doc.update({k: v for k, v in metrics.items() if k not in ("duration_s", "errors", "slo")})
    doc.setdefault("request_goodput", None)
    doc.update(input_lens=[r.prompt_len for r in results], output_lens=[r.output_tokens for r in results],
               ttfts=[r.ttft_s or 0.0 for r in results], itls=[list(r.itl_s) for r in results],
               generated_texts=[r.text for r in results], errors=[r.error for r in results])
    return doc


def default_result_filename(backend: str, request_rate: float, max_concurrency: int | None, model_id: str) -> str:
    """vLLM's name: ``openai-infqps-concurrency8-<model>-20261201-120000.json``."""
    rate = "inf" if math.isinf(request_rate) else f"{request_rate:g}"
    conc = f"-concurrency{max_concurrency}" if max_concurrency is not None else ""
    model = model_id.rstrip("/").split("/")[-1].replace(":", "-")
    return f"{backend}-{rate}qps{conc}-{model}-{time.strftime('%Y%m%d-%H%M%S')}.json"
