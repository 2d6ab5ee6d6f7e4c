"""``csps bench serve``: online load against an OpenAI-compatible server (``csps serve`` or any other).

Requests go out on their arrival times (all at once, Poisson or fixed rate; ``--max-concurrency``
caps those in flight) as streaming completions (httpx, async). Per request the client records the
time to the first streamed output chunk (TTFT), the gaps between output chunks (ITL), the end-to-end
latency (E2EL) and TPOT = (E2EL - TTFT) / (output tokens - 1); output tokens come from the server's
usage report when it sends one, else they are the number of output chunks. Metric names follow
``vllm bench serve``: ``mean_ttft_ms``, ``median_itl_ms``, ``p99_e2el_ms``, ``request_throughput``,
``output_throughput``, ``request_goodput`` ...

Goodput (``--goodput ttft:MS tpot:MS e2el:MS`` as in vLLM, or ``--slo ttft=.. tbt=..``): requests per
second within every SLO given. ``--api-key`` (default ``$OPENAI_API_KEY``) and ``--header K=V`` go on every
request; ``--save-result`` writes vLLM's result JSON (``csps.bench.serve_result``); datasets beyond the
engine workloads (ShareGPT files, prefix repetition) are in ``csps.bench.serve_data``.
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
from dataclasses import dataclass, field

from csps.bench.report import percentile
from csps.bench.serve_result import serve_metrics

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
    text: str = ""

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
    headers: tuple[tuple[str, str], ...] = ()  # on every request (the API key, --header)

    @property
    def backend(self) -> str:
        """vLLM's name for the endpoint type."""
        return "openai-chat" if self.endpoint.endswith("/chat/completions") else "openai"

    def describe(self) -> dict:
        """For result files: the header names only (they may hold secrets)."""
        return {"base_url": self.base_url, "model": self.model, "endpoint": self.endpoint,
                "timeout_s": self.timeout_s, "headers": sorted({k for k, _ in self.headers})}

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
    chunks, usage, parts = 0, None, []
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
                if obj.get("choices"):
                    c = obj["choices"][0]
                    parts.append(c.get("text") or (c.get("delta") or {}).get("content") or "")
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
    res.text = "".join(parts)
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

    async with httpx.AsyncClient(base_url=target.base_url, limits=limits, timeout=target.timeout_s,
                                 headers=dict(target.headers)) as client:
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


# --- queueing delay from the server's histogram -------------------------------------------------

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

def measure(target: ServeTarget, prompts: list[Prompt], **kw) -> dict:
    return measure_run(target, prompts, **kw)[0]


def measure_run(target: ServeTarget, prompts: list[Prompt], *, max_concurrency: int | None, slo: dict | None,
                unloaded_ttft_s: float | None, progress: bool = False,
                stats: dict | None = None) -> tuple[dict, list[RequestResult]]:
    """One load run: metrics plus the median queueing delay (server histogram, else estimated), and the
    per-request results. ``stats``: percentile_metrics / percentiles for ``serve_metrics``."""
    before = _scrape(target.base_url)
    results, duration = run_load(target, prompts, max_concurrency, progress)
    m = serve_metrics(results, duration, slo, **(stats or {}))
    after = _scrape(target.base_url) if before is not None else None
    if before is not None and after is not None:
        m["median_queue_s"] = histogram_quantile(_histogram(before, QUEUE_METRIC), _histogram(after, QUEUE_METRIC), 0.5)
        m["queue_source"] = f"server /metrics {QUEUE_METRIC}"
    else:
        base = unloaded_ttft_s or 0.0
        m["median_queue_s"] = percentile([max(0.0, r.ttft_s - base) for r in results if r.ok], 50)
        m["queue_source"] = "estimated: TTFT minus the TTFT of one request sent alone"
    return m, results


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
