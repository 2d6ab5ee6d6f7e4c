"""ServerConfig: everything ``csps serve`` needs besides the engine's own settings (frozen, validated)."""

from __future__ import annotations

from dataclasses import dataclass, field

from csps.errors import CspsError
from csps.server.fim import CHOICES as FIM_CHOICES
from csps.server.grammar_jobs import DEFAULT_TIMEOUT_S


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise CspsError(msg)


@dataclass(frozen=True)
class ServerConfig:
    # the engine: keyword arguments of csps.llm.make_engine_config (model, sp, tp, token_budget, ...)
    engine_kwargs: dict = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # when set, all but the probes, /metrics and the API docs need 'Bearer <key>'
    served_model_name: str | None = None  # default: the --model value
    max_body_bytes: int = 32 << 20
    max_waiting: int = 1024  # requests queued in the engine beyond this get 429
    retry_after_s: int = 1  # the Retry-After header of a 429
    drain_timeout_s: float = 120.0  # SIGTERM: how long in-flight requests may take to finish
    engine_start_timeout_s: float = 900.0
    engine_stall_s: float = 60.0  # /health reports 'stalled' when the engine is silent this long
    rpc_timeout_s: float = 30.0
    summarize_concurrency: int = 8  # chunk summaries in flight at once per /v1/summarize call
    access_log: bool = False
    log_level: str = "info"
    log_format: str = "text"  # text | json (one object per line, with the request id inside requests)
    allowed_origins: tuple[str, ...] = ()  # CORS: browser origins allowed to call the API ('*': any)
    metrics_compat: str | None = None  # 'vllm': also export vLLM's metric names
    sse_keepalive_interval_s: float = 15.0  # a ': keepalive' comment line on a stream silent this long (0: off)
    fim_template: str = "auto"  # auto (from the vocabulary) | none | a name in csps.server.fim.TEMPLATES
    grammar_compile_timeout_s: float = DEFAULT_TIMEOUT_S  # structured outputs: a grammar not compiled by then is a 400

    def __post_init__(self) -> None:
        _check(0 <= self.port < 65536, f"port must be in 0..65535, got {self.port}")
        _check(self.max_body_bytes > 0, "max_body_bytes must be positive")
        _check(self.max_waiting >= 1, "max_waiting must be at least 1")
        _check(self.retry_after_s >= 1, "retry_after_s must be at least 1")
        _check(self.drain_timeout_s >= 0, "drain_timeout_s must be >= 0")
        _check(self.engine_start_timeout_s > 0, "engine_start_timeout_s must be positive")
        _check(self.grammar_compile_timeout_s > 0, "grammar_compile_timeout_s must be positive")
        _check(self.summarize_concurrency >= 1, "summarize_concurrency must be at least 1")
        _check(self.api_key is None or len(self.api_key) > 0, "api_key must not be empty")
        _check("model" in self.engine_kwargs, "engine_kwargs must name a model")
        _check(self.log_format in ("text", "json"), f"log_format must be text or json, got {self.log_format!r}")
        _check(self.metrics_compat in (None, "vllm"), f"metrics_compat must be vllm, got {self.metrics_compat!r}")
        _check(all(isinstance(o, str) and o for o in self.allowed_origins), "allowed_origins must be non-empty strings")
        _check(self.sse_keepalive_interval_s >= 0,
               f"sse_keepalive_interval_s must be >= 0 (0: off), got {self.sse_keepalive_interval_s}")
        _check(self.fim_template in FIM_CHOICES,
               f"fim_template must be one of {', '.join(FIM_CHOICES)}, got {self.fim_template!r}")

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.engine_kwargs["model"]
