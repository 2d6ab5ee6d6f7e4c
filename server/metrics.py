"""Prometheus metrics of the server, in their own registry (no process-global collectors).

Latencies come from the engine's per-request timestamps (``RequestMetrics``: the single definition
of TTFT and inter-token latency), sent with each request's last delta. Gauges (running, waiting,
KV blocks per rank, prefix-cache hit rate) are refreshed from the engine's stats on each scrape.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0,
                     640.0, 1280.0)
ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)
BYTES_BUCKETS = tuple(float(4 ** k) for k in range(5, 17))  # 1 KiB .. 4 GiB


@dataclass(frozen=True)
class FinishedRequest:
    """A finished request's counts and latencies (seconds), from the engine's timestamps."""

    reason: str
    prompt_tokens: int
    cached_tokens: int
    ttft_s: float | None
    queue_s: float | None
    e2e_s: float | None
    itl_s: list[float]

    @classmethod
    def of(cls, it: dict) -> FinishedRequest:
        t = it["m"]

        def since_arrival(key: str) -> float | None:
            return None if t[key] is None else max(0.0, t[key] - t["arrival_s"])

        return cls(reason=it["reason"] or "unknown", prompt_tokens=it["np"], cached_tokens=it["nc"],
                   ttft_s=since_arrival("first_token_s"), queue_s=since_arrival("first_scheduled_s"),
                   e2e_s=since_arrival("finished_s"), itl_s=list(t["tbt_s"]))


class ServerMetrics:
    """The ``csps_*`` metrics. ``mirrors`` export other names for the same quantities in the same
    registry (``csps.server.metrics_vllm.VllmMetrics`` for ``--metrics-compat vllm``)."""

    def __init__(self, model_name: str) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.labels = {"model_name": model_name}
        lab = ["model_name"]
        self.ttft_s = Histogram("csps_time_to_first_token_seconds", "Time to first token (arrival to first token)",
                                lab, buckets=LATENCY_BUCKETS_S, registry=r)
        self.itl_s = Histogram("csps_inter_token_latency_seconds", "Time between consecutive generated tokens",
                               lab, buckets=ITL_BUCKETS_S, registry=r)
        self.e2e_s = Histogram("csps_e2e_request_latency_seconds", "Arrival to last token", lab,
                               buckets=LATENCY_BUCKETS_S, registry=r)
        self.queue_s = Histogram("csps_request_queue_time_seconds", "Arrival to first scheduled step", lab,
                                 buckets=LATENCY_BUCKETS_S, registry=r)
        self.finished = Counter("csps_request_success", "Finished requests by finish reason",
                                lab + ["finished_reason"], registry=r)
        self.prompt_tokens = Counter("csps_prompt_tokens", "Prompt tokens of finished requests", lab, registry=r)
        self.cached_tokens = Counter("csps_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache",
                                     lab, registry=r)
        self.generation_tokens = Counter("csps_generation_tokens", "Generated tokens", lab, registry=r)
        self.http_errors = Counter("csps_http_errors", "Error responses by status code", lab + ["status"],
                                   registry=r)
        self.aborted = Counter("csps_requests_aborted", "Requests aborted (client gone or error)", lab, registry=r)
        self.steps = Counter("csps_engine_steps", "Engine steps", lab, registry=r)
        self.step_s = Histogram("csps_engine_step_duration_seconds", "Duration of one engine step", lab,
                                buckets=ITL_BUCKETS_S, registry=r)
        self.step_tokens = Counter("csps_engine_step_tokens", "Tokens computed by engine steps",
                                   lab + ["kind"], registry=r)
        self.step_bytes = Histogram("csps_engine_step_bytes", "Bytes moved between ranks per step, by kind",
                                    lab + ["kind"], buckets=BYTES_BUCKETS, registry=r)
        self.running = Gauge("csps_num_requests_running", "Requests running in the engine", lab, registry=r)
        self.waiting = Gauge("csps_num_requests_waiting", "Requests waiting in the engine", lab, registry=r)
        self.kv_used = Gauge("csps_kv_blocks_used", "KV-cache blocks in use", lab + ["rank"], registry=r)
        self.kv_total = Gauge("csps_kv_blocks_total", "KV-cache blocks", lab + ["rank"], registry=r)
        self.kv_usage = Gauge("csps_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use", lab + ["rank"],
                              registry=r)
        self.hit_rate = Gauge("csps_prefix_cache_hit_rate", "Prompt tokens found in the prefix cache / looked up",
                              lab, registry=r)
        self.engine_up = Gauge("csps_engine_up", "1 when the engine is ready", lab, registry=r)
        self.preemptions = Counter("csps_num_preemptions", "Requests preempted (KV freed, recomputed later)",
                                   lab, registry=r)
        self.mirrors: list = []  # more names for the same quantities (VllmMetrics), fed from here

    def observe_outputs(self, items: list[dict], steps: list[list]) -> None:
        m = self.labels["model_name"]
        for duration_s, num_prefill, num_decode, bytes_by_kind, *rest in steps:
            self.steps.labels(m).inc()
            self.step_s.labels(m).observe(duration_s)
            if num_prefill:
                self.step_tokens.labels(m, "prefill").inc(num_prefill)
            if num_decode:
                self.step_tokens.labels(m, "decode").inc(num_decode)
            for kind, n in bytes_by_kind.items():
                self.step_bytes.labels(m, kind).observe(n)
            preempted = rest[0] if rest else 0
            if preempted:
                self.preemptions.labels(m).inc(preempted)
            for mirror in self.mirrors:
                mirror.on_step(preempted)
        for it in items:
            if it["ids"]:
                self.generation_tokens.labels(m).inc(len(it["ids"]))
                for mirror in self.mirrors:
                    mirror.on_tokens(len(it["ids"]))
            if it["done"]:
                self.on_finished(FinishedRequest.of(it))

    def on_finished(self, r: FinishedRequest) -> None:
        m = self.labels["model_name"]
        self.finished.labels(m, r.reason).inc()
        self.prompt_tokens.labels(m).inc(r.prompt_tokens)
        self.cached_tokens.labels(m).inc(r.cached_tokens)
        for hist, value in ((self.ttft_s, r.ttft_s), (self.queue_s, r.queue_s), (self.e2e_s, r.e2e_s)):
            if value is not None:
                hist.labels(m).observe(value)
        for dt in r.itl_s:
            self.itl_s.labels(m).observe(dt)
        for mirror in self.mirrors:
            mirror.on_finished(r)

    def set_stats(self, stats: dict, engine_ready: bool) -> None:
        m = self.labels["model_name"]
        self.engine_up.labels(m).set(1 if engine_ready else 0)
        if not stats:
            return
        self.running.labels(m).set(stats["num_running"])
        self.waiting.labels(m).set(stats["num_waiting"])
        for rank, (used, total) in enumerate(zip(stats["kv_blocks_used"], stats["kv_blocks_total"])):
            self.kv_used.labels(m, str(rank)).set(used)
            self.kv_total.labels(m, str(rank)).set(total)
            self.kv_usage.labels(m, str(rank)).set(used / total if total else 0.0)
        self.hit_rate.labels(m).set(stats["prefix_cache_hit_rate"])
        for mirror in self.mirrors:
            mirror.on_stats(stats)

    def render(self) -> bytes:
        return generate_latest(self.registry)
