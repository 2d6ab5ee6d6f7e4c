"""vLLM's metric names for the quantities csps already measures (``csps serve --metrics-compat vllm``), so
dashboards and alerts written for vLLM work unchanged. Same label (``model_name``), same units; the
definitions are csps's (see ``csps.server.metrics``). Counters get prometheus-client's ``_total`` suffix,
as vLLM's do (``vllm:prompt_tokens_total``).
"""

from __future__ import annotations

from csps.server.metrics import ITL_BUCKETS_S, LATENCY_BUCKETS_S, FinishedRequest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

NAMES = ("vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds", "vllm:e2e_request_latency_seconds",
         "vllm:request_queue_time_seconds", "vllm:num_requests_running", "vllm:num_requests_waiting",
         "vllm:kv_cache_usage_perc", "vllm:prefix_cache_queries", "vllm:prefix_cache_hits", "vllm:num_preemptions",
         "vllm:prompt_tokens", "vllm:generation_tokens", "vllm:request_success")


class VllmMetrics:
    def __init__(self, model_name: str, registry: CollectorRegistry) -> None:
        self.model = model_name
        r, lab = registry, ["model_name"]
        self.ttft_s = Histogram(NAMES[0], "Histogram of time to first token in seconds.", lab,
                                buckets=LATENCY_BUCKETS_S, registry=r)
        self.itl_s = Histogram(NAMES[1], "Histogram of inter-token latency in seconds.", lab,
                               buckets=ITL_BUCKETS_S, registry=r)
        self.e2e_s = Histogram(NAMES[2], "Histogram of e2e request latency in seconds.", lab,
                               buckets=LATENCY_BUCKETS_S, registry=r)
        self.queue_s = Histogram(NAMES[3], "Histogram of time spent in WAITING phase for request.", lab,
                                 buckets=LATENCY_BUCKETS_S, registry=r)
        self.running = Gauge(NAMES[4], "Number of requests in model execution batches.", lab, registry=r)
        self.waiting = Gauge(NAMES[5], "Number of requests waiting to be processed.", lab, registry=r)
        self.kv_usage = Gauge(NAMES[6], "KV-cache usage. 1 means 100 percent usage (all ranks together).", lab,
                              registry=r)
        self.prefix_queries = Counter(NAMES[7], "Prefix cache queries, in terms of number of queried tokens.",
                                      lab, registry=r)
        self.prefix_hits = Counter(NAMES[8], "Prefix cache hits, in terms of number of cached tokens.", lab,
                                   registry=r)
        self.preemptions = Counter(NAMES[9], "Cumulative number of preemption from the engine.", lab, registry=r)
        self.prompt_tokens = Counter(NAMES[10], "Number of prefill tokens processed.", lab, registry=r)
        self.generation_tokens = Counter(NAMES[11], "Number of generation tokens processed.", lab, registry=r)
        self.success = Counter(NAMES[12], "Count of successfully processed requests.", lab + ["finished_reason"],
                               registry=r)
        # the label sets exist from the start, as in vLLM (dashboards show 0 instead of 'no data')
        for metric in (self.ttft_s, self.itl_s, self.e2e_s, self.queue_s, self.running, self.waiting,
                       self.kv_usage, self.prefix_queries, self.prefix_hits, self.preemptions, self.prompt_tokens,
                       self.generation_tokens):
            metric.labels(model_name)
        for reason in ("stop", "length", "abort"):
            self.success.labels(model_name, reason)

    def on_step(self, num_preempted: int) -> None:
        if num_preempted:
            self.preemptions.labels(self.model).inc(num_preempted)

    def on_tokens(self, n: int) -> None:
        self.generation_tokens.labels(self.model).inc(n)

    def on_finished(self, r: FinishedRequest) -> None:
        m = self.model
        self.success.labels(m, r.reason).inc()
        self.prompt_tokens.labels(m).inc(r.prompt_tokens)
        self.prefix_queries.labels(m).inc(r.prompt_tokens)
        self.prefix_hits.labels(m).inc(r.cached_tokens)
        for hist, value in ((self.ttft_s, r.ttft_s), (self.queue_s, r.queue_s), (self.e2e_s, r.e2e_s)):
            if value is not None:
                hist.labels(m).observe(value)
        for dt in r.itl_s:
            self.itl_s.labels(m).observe(dt)

    def on_stats(self, stats: dict) -> None:
        m = self.model
        self.running.labels(m).set(stats["num_running"])
        self.waiting.labels(m).set(stats["num_waiting"])
        total = sum(stats["kv_blocks_total"])
        self.kv_usage.labels(m).set(sum(stats["kv_blocks_used"]) / total if total else 0.0)
