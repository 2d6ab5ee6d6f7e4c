"""``csps bench serve``: online load against an OpenAI-compatible server (``csps serve`` or any other).

Requests go out on their arrival times (all at once, Poisson or fixed rate; ``--max-concurrency``
caps those in flight) as streaming completions (httpx, async). Per request the client records the
time to the first streamed output chunk (TTFT), the gaps between output chunks (ITL), the end-to-end
latency (E2EL) and TPOT = (E2EL - TTFT) / (output tokens - 1); output tokens come from the server's
usage report when it sends one, else they are the number of output chunks. Metric names follow
``vllm bench serve``: ``mean_ttft_ms``, ``median_itl_ms``, ``p99_e2el_ms``, ``request_throughput``,
``output_throughput``, ``request_goodput`` ...

Goodput (``--slo ttft=.. tbt=..``): requests per second whose TTFT and TPOT are within the SLO.
Capacity (``--find-capacity``, Sarathi-Serve's definition): the highest request rate whose p99 ITL
(TBT) stays under the TBT SLO while the median queueing delay is at most 2 s; each trial sends
requests for at least ``--capacity-duration`` (more prompts at higher rates), so that an overloaded
server builds a queue instead of absorbing one burst. Queueing delay comes
from the server's ``csps_request_queue_time_seconds`` histogram on ``/metrics`` when it has one
(median interpolated within buckets), else it is estimated as TTFT minus the TTFT of one request
sent alone before the run.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from dataclasses import asdict, dataclass, field

from csps.bench_report import percentile
from csps.errors import CspsError

MAX_MEDIAN_QUEUE_S = 2.0  # Sarathi-Serve's capacity condition
QUEUE_METRIC = "csps_request_queue_time_seconds"


@dataclass(frozen=True)
class Prompt:
    text: str
    prompt_len: int  # tokens, as the client's tokenizer counts them
    output_len: int
    arrival_s: float


@dataclass
class RequestResult:
    ok: bool
    prompt_len: int
    output_tokens: int = 0
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    e2el_s: float | None = None
    error: str = ""

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.e2el_s is None or self.output_tokens < 2:
            return None
        return (self.e2el_s - self.ttft_s) / (self.output_tokens - 1)


@dataclass(frozen=True)
class ServeTarget:
    base_url: str
    model: str
    endpoint: str = "/v1/completions"
    timeout_s: float = 600.0

    def body(self, p: Prompt) -> dict:
        common = {"model": self.model, "max_tokens": p.output_len, "temperature": 0.0, "stream": True,
                  "stream_options": {"include_usage": True}, "ignore_eos": True}
        if self.endpoint.endswith("/chat/completions"):
            return {**common, "messages": [{"role": "user", "content": p.text}]}
        return {**common, "prompt": p.text}


def _is_token_chunk(obj: dict, seen_any: bool) -> bool:
    """A streamed chunk that carries generated output: text (which may be empty when a token decodes to
    nothing, e.g. a special token of a random-weight model), or chat content. Not a chat role-only
    chunk, and not the closing chunk that only reports finish_reason (unless nothing came before)."""
    choices = obj.get("choices") or []
    if not choices:
        return False
    c = choices[0]
    if "delta" in c:
        return "content" in (c["delta"] or {}) and (bool(c["delta"]["content"]) or c.get("finish_reason") is None)
    return bool(c.get("text")) or c.get("finish_reason") is None or not seen_any


async def send_one(client, target: ServeTarget, p: Prompt) -> RequestResult:
    """One streaming request; the timings of its text chunks."""
    res = RequestResult(ok=False, prompt_len=p.prompt_len)
    start = last = time.perf_counter()
    chunks, usage = 0, None
    try:
        async with client.stream("POST", target.endpoint, json=target.body(p), timeout=target.timeout_s) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if obj.get("usage"):
                    usage = obj["usage"]
                if obj.get("error"):
                    res.error = str(obj["error"])[:200]
                    return res
                if _is_token_chunk(obj, chunks > 0):
                    now = time.perf_counter()
                    if res.ttft_s is None:
                        res.ttft_s = now - start
                    else:
                        res.itl_s.append(now - last)
                    last = now
                    chunks += 1
    except Exception as e:  # noqa: BLE001 - a failed request is a result, not a crash
        res.error = f"{type(e).__name__}: {e}"[:200]
        return res
    res.e2el_s = time.perf_counter() - start
    res.output_tokens = int(usage.get("completion_tokens", chunks)) if usage else chunks
    if usage and usage.get("prompt_tokens"):
        res.prompt_len = int(usage["prompt_tokens"])
    res.ok = res.ttft_s is not None
    if not res.ok:
        res.error = "no output was streamed"
    return res


async def _run(target: ServeTarget, prompts: list[Prompt], max_concurrency: int | None,
               progress: bool) -> tuple[list[RequestResult], float]:
    import httpx

    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    limits = httpx.Limits(max_connections=max_concurrency or 10_000, max_keepalive_connections=100)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(prompts), unit="req", desc="bench serve")

    async def limited(client, p: Prompt) -> RequestResult:
        if sem is None:
            r = await send_one(client, target, p)
        else:
            async with sem:
                r = await send_one(client, target, p)
        if bar is not None:
            bar.update(1)
        return r

    async with httpx.AsyncClient(base_url=target.base_url, limits=limits, timeout=target.timeout_s) as client:
        t0 = time.perf_counter()
        tasks = []
        for p in sorted(prompts, key=lambda x: x.arrival_s):
            delay = t0 + p.arrival_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(limited(client, p)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    return list(results), duration


def run_load(target: ServeTarget, prompts: list[Prompt], max_concurrency: int | None = None,
             progress: bool = False) -> tuple[list[RequestResult], float]:
    return asyncio.run(_run(target, prompts, max_concurrency, progress))


# --- metrics ----------------------------------------------------------------------------------------

def _ms_stats(name: str, values: list[float]) -> dict:
    out = {f"mean_{name}_ms": 1e3 * sum(values) / len(values) if values else None}
    for key, q in (("median", 50), ("p90", 90), ("p99", 99)):
        v = percentile(values, q)
        out[f"{key}_{name}_ms"] = None if v is None else 1e3 * v
    return out


def serve_metrics(results: list[RequestResult], duration_s: float, slo: dict[str, float] | None = None) -> dict:
    """vllm-bench-serve-named metrics of one run."""
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    m = {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration_s,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration_s if duration_s > 0 else None,
        "output_throughput": out_tokens / duration_s if duration_s > 0 else None,
        "total_token_throughput": (in_tokens + out_tokens) / duration_s if duration_s > 0 else None,
    }
    m.update(_ms_stats("ttft", [r.ttft_s for r in ok]))
    m.update(_ms_stats("tpot", [r.tpot_s for r in ok if r.tpot_s is not None]))
    m.update(_ms_stats("itl", [x for r in ok for x in r.itl_s]))
    m.update(_ms_stats("e2el", [r.e2el_s for r in ok]))
    if slo:
        good = [r for r in ok if r.ttft_s <= slo.get("ttft", math.inf)
                and (r.tpot_s is None or r.tpot_s <= slo.get("tbt", math.inf))]
        m["request_goodput"] = len(good) / duration_s if duration_s > 0 else None
        m["slo"] = dict(slo)
    errors = sorted({r.error for r in results if not r.ok})
    if errors:
        m["errors"] = errors[:5]
    return m


def _histogram(text: str, name: str) -> dict[float, float]:
    """Cumulative bucket counts of a Prometheus histogram, summed over label sets."""
    out: dict[float, float] = {}
    for line in text.splitlines():
        if not line.startswith(name + "_bucket"):
            continue
        m = re.search(r'le="([^"]+)"', line)
        if m:
            le = math.inf if m.group(1) == "+Inf" else float(m.group(1))
            out[le] = out.get(le, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def histogram_quantile(before: dict[float, float], after: dict[float, float], q: float) -> float | None:
    """The q-quantile (0-1) of the observations between two scrapes, interpolated within buckets."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    if not counts or counts[-1] <= 0:
        return None
    rank, prev_bound, prev_count = q * counts[-1], 0.0, 0.0
    for b, c in zip(bounds, counts):
        if c >= rank:
            if math.isinf(b):
                return prev_bound
            return prev_bound + (b - prev_bound) * (rank - prev_count) / max(c - prev_count, 1e-12)
        prev_bound, prev_count = b, c
    return prev_bound


def _scrape(base_url: str) -> str | None:
    import httpx

    try:
        r = httpx.get(base_url.rstrip("/") + "/metrics", timeout=10)
        return r.text if r.status_code == 200 and QUEUE_METRIC in r.text else None
    except httpx.HTTPError:
        return None


# --- a measured rate ----------------------------------------------------------------------------------

def measure(target: ServeTarget, prompts: list[Prompt], *, max_concurrency: int | None, slo: dict | None,
            unloaded_ttft_s: float | None, progress: bool = False) -> dict:
    """One load run: metrics plus the median queueing delay (server histogram, else estimated)."""
    before = _scrape(target.base_url)
    results, duration = run_load(target, prompts, max_concurrency, progress)
    m = serve_metrics(results, duration, slo)
    after = _scrape(target.base_url) if before is not None else None
    if before is not None and after is not None:
        m["median_queue_s"] = histogram_quantile(_histogram(before, QUEUE_METRIC), _histogram(after, QUEUE_METRIC), 0.5)
        m["queue_source"] = f"server /metrics {QUEUE_METRIC}"
    else:
        base = unloaded_ttft_s or 0.0
        m["median_queue_s"] = percentile([max(0.0, r.ttft_s - base) for r in results if r.ok], 50)
        m["queue_source"] = "estimated: TTFT minus the TTFT of one request sent alone"
    return m


def meets_capacity_slo(m: dict, tbt_slo_s: float) -> bool:
    p99_itl = m.get("p99_itl_ms")
    queue = m.get("median_queue_s")
    return (m["failed"] == 0 and p99_itl is not None and p99_itl / 1e3 <= tbt_slo_s
            and queue is not None and queue <= MAX_MEDIAN_QUEUE_S)


def find_capacity(run_at, tbt_slo_s: float, start_rate: float = 1.0, steps: int = 4,
                  max_doublings: int = 10) -> tuple[float | None, list[dict]]:
    """Highest passing rate: double (or halve) to bracket, then bisect ``steps`` times.
    ``run_at(rate) -> metrics``; returns (capacity or None, every trial)."""
    trials = []

    def ok(rate: float) -> bool:
        m = run_at(rate)
        m["request_rate"] = rate
        m["meets_slo"] = meets_capacity_slo(m, tbt_slo_s)
        trials.append(m)
        return m["meets_slo"]

    lo = hi = None
    if ok(start_rate):
        lo, rate = start_rate, start_rate * 2
        for _ in range(max_doublings):
            if not ok(rate):
                hi = rate
                break
            lo, rate = rate, rate * 2
    else:
        hi, rate = start_rate, start_rate / 2
        for _ in range(max_doublings):
            if ok(rate):
                lo = rate
                break
            hi, rate = rate, rate / 2
    if lo is None or hi is None:
        return lo, trials
    for _ in range(steps):
        mid = (lo + hi) / 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo, trials


# --- CLI -------------------------------------------------------------------------------------------------

def make_prompts(a, tokenizer, rate: float, min_count: int = 0) -> list[Prompt]:
    from dataclasses import replace

    from csps.bench_cli import workload_config
    from csps.workloads import make_workload

    cfg = workload_config(a, default_prompts=100)
    cfg = replace(cfg, request_rate_per_s=rate, num_prompts=max(cfg.num_prompts, min_count))
    specs = make_workload(cfg, tokenizer=tokenizer, vocab_size=tokenizer.vocab_size)
    return [Prompt(tokenizer.decode(list(s.prompt_ids)), s.prompt_len, s.output_len, s.arrival_s) for s in specs]


def served_model(base_url: str) -> str:
    import httpx

    try:
        r = httpx.get(base_url.rstrip("/") + "/v1/models", timeout=30)
        r.raise_for_status()
        return r.json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
        raise CspsError(f"cannot list the models of {base_url} ({e}); is the server running? pass --model") from None


def print_metrics(m: dict) -> None:
    keys = ["completed", "failed", "duration_s", "request_throughput", "request_goodput", "output_throughput",
            "total_token_throughput"] + [f"{s}_{n}_ms" for n in ("ttft", "tpot", "itl", "e2el")
                                         for s in ("mean", "median", "p99")] + ["median_queue_s"]
    for k in keys:
        if k in m and m[k] is not None:
            v = m[k]
            print(f"  {k:<24} {v:.4g}" if isinstance(v, float) else f"  {k:<24} {v}")


def main_serve(a) -> int:
    from csps.bench import default_json_path
    from csps.bench_report import document, git_revision, write_json
    from csps.tokenizer import Tokenizer, load_tokenizer

    git = git_revision()
    target = ServeTarget(a.base_url.rstrip("/"), a.model or served_model(a.base_url), a.endpoint, a.timeout)
    tokenizer = Tokenizer(load_tokenizer(a.tokenizer))
    probe = make_prompts(a, tokenizer, math.inf)[0]
    first, _ = run_load(target, [Prompt(probe.text, probe.prompt_len, 2, 0.0)])
    if not first[0].ok:
        raise CspsError(f"the first test request to {target.base_url}{target.endpoint} failed: {first[0].error}")
    unloaded_ttft = first[0].ttft_s
    common = dict(max_concurrency=a.max_concurrency, slo=a.slo, unloaded_ttft_s=unloaded_ttft)
    config = {"target": asdict(target), "max_concurrency": a.max_concurrency, "slo": a.slo,
              "dataset": a.dataset, "num_prompts": a.num_prompts or 100, "prompt_len": a.prompt_len,
              "output_len": a.output_len, "range_ratio": a.range_ratio, "arrival": a.arrival, "seed": a.seed,
              "unloaded_ttft_s": unloaded_ttft}
    if a.find_capacity:
        if not a.slo or "tbt" not in a.slo:
            raise CspsError("--find-capacity needs a TBT SLO, e.g. --slo 'ttft=10s tbt=200ms'")
        start = a.request_rate if math.isfinite(a.request_rate) else 1.0
        # each trial offers load for at least --capacity-duration: a short burst always "fits"
        capacity, trials = find_capacity(
            lambda r: measure(target, make_prompts(a, tokenizer, r, math.ceil(r * a.capacity_duration)), **common),
            a.slo["tbt"], start, a.capacity_steps)
        for t in trials:
            print(f"rate {t['request_rate']:.3g}/s: p99 ITL {t['p99_itl_ms'] or float('nan'):.1f} ms, median queue "
                  f"{t['median_queue_s'] if t['median_queue_s'] is not None else float('nan'):.2f} s, "
                  f"failed {t['failed']} -> {'meets' if t['meets_slo'] else 'misses'} the SLO")
        print(f"capacity: {capacity if capacity is not None else 'none found'} requests/s "
              f"(p99 TBT <= {a.slo['tbt'] * 1e3:.0f} ms, median queueing <= {MAX_MEDIAN_QUEUE_S:.0f} s)")
        results = {"capacity_requests_per_s": capacity, "trials": trials}
    else:
        m = measure(target, make_prompts(a, tokenizer, a.request_rate), progress=not a.no_progress, **common)
        m["request_rate"] = a.request_rate
        print_metrics(m)
        results = m
    path = a.json or default_json_path("serve")
    write_json(path, document("csps bench serve", config, results, git=git))
    print(f"results: {path}")
    return 0
