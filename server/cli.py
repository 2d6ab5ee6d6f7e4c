"""``csps serve``: the OpenAI-compatible HTTP server (API process + engine process)."""

from __future__ import annotations

import argparse
import os

from csps.server.config_file import (
    BooleanOptional,
    ConfigFileAction,
    StoreConst,
    track_explicit_flags,
)
from csps.server.fim import CHOICES as FIM_CHOICES
from csps.server.grammar_jobs import DEFAULT_TIMEOUT_S


def parse_bytes(text: str) -> int:
    """Sizes with suffixes: '1048576', '512k', '32M', '1G' (powers of 1024)."""
    t = text.strip().upper().removesuffix("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    try:
        value = int(float(t[:-1] if mult > 1 else t) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 1048576, 512k, 32M)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return value


def seconds_or_off(text: str) -> float:
    """A number of seconds >= 0, or 'off' (= 0: the feature is off)."""
    t = text.strip().lower()
    if t == "off":
        return 0.0
    try:
        value = float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds (or off): {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0 or off: never): {text!r}")
    return value


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def add_vllm_aliases(p: argparse.ArgumentParser) -> None:
    """vLLM's flag names where the meaning is the same (--max-model-len and --max-num-seqs already match)."""
    g = p.add_argument_group("vLLM flag names")
    g.add_argument("--tensor-parallel-size", "-tp", dest="tp", type=int, default=argparse.SUPPRESS,
                   help="= --tp")
    g.add_argument("--max-num-batched-tokens", dest="token_budget", type=int, default=argparse.SUPPRESS,
                   help="= --token-budget")
    g.add_argument("--enable-prefix-caching", dest="no_prefix_caching", action=StoreConst, const=False,
                   default=argparse.SUPPRESS, help="(the default)")
    g.add_argument("--no-enable-prefix-caching", dest="no_prefix_caching", action=StoreConst, const=True,
                   default=argparse.SUPPRESS, help="= --no-prefix-caching")


def add_serve_parser(subparsers, add_engine_args) -> None:
    p = subparsers.add_parser("serve", help="serve an OpenAI-compatible HTTP API (and /v1/summarize)")
    track_explicit_flags(p)  # before any argument: --config must know which flags the command line gave
    p.add_argument("--config", action=ConfigFileAction, metavar="FILE.yaml",
                   help="read any of these flags from a YAML mapping (flag: value); the command line wins")
    add_engine_args(p)
    add_vllm_aliases(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=8000, help="0 picks a free port (logged)")
    g.add_argument("--api-key", default=os.environ.get("CSPS_API_KEY"),
                   help="require 'Authorization: Bearer <key>' on /v1/*, /infill, /completion, /tokenize, /detokenize "
                        "(default: $CSPS_API_KEY)")
    g.add_argument("--served-model-name", default=None, help="the model id clients use (default: --model)")
    g.add_argument("--max-body-bytes", type=parse_bytes, default=32 << 20, help="larger request bodies get 413")
    g.add_argument("--max-waiting", type=int, default=1024,
                   help="requests queued in the engine beyond this get 429 with Retry-After")
    g.add_argument("--drain-timeout", type=float, default=120.0,
                   help="seconds in-flight requests may take to finish after SIGTERM")
    g.add_argument("--engine-start-timeout", type=float, default=900.0)
    g.add_argument("--summarize-concurrency", type=int, default=8,
                   help="chunk summaries in flight at once per /v1/summarize request")
    g.add_argument("--access-log", action=BooleanOptional, default=False, help="log every request")
    g.add_argument("--allowed-origins", nargs="+", default=[], metavar="ORIGIN",
                   help="browser origins allowed by CORS, e.g. https://app.example ('*': any; default: none)")
    g.add_argument("--metrics-compat", choices=["vllm"], default=None,
                   help="also export vLLM's metric names (vllm:time_to_first_token_seconds, ...) on /metrics")
    g.add_argument("--grammar-compile-timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                   help="structured outputs: a schema, regex or grammar not compiled by then gets a 400")
    g.add_argument("--log-format", choices=["text", "json"], default="text",
                   help="json: one JSON object per log line (with request_id inside requests)")
    g.add_argument("--sse-keepalive-interval", type=seconds_or_off, default=15.0, metavar="SECONDS",
                   help="send a ': keepalive' SSE comment on a stream that sent nothing for this long (proxies "
                        "cut idle connections; a long prefill sends nothing else); 0 or off: never")
    g.add_argument("--fim-template", choices=FIM_CHOICES, default="auto",
                   help="fill-in-the-middle template for /infill and suffix: auto (from the tokenizer's vocabulary), "
                        "none, or force one (markers the vocabulary lacks are tokenized as text)")
    p.set_defaults(func=cmd_serve)


def torchrun_worker_rank() -> bool:
    """Under torchrun, ranks 1..W-1 join rank 0's engine instead of serving HTTP (env vars: no torch here)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["RANK"]) != 0


def cmd_serve(a: argparse.Namespace) -> int:
    from csps.server.config import ServerConfig
    from csps.server.logs import setup_logging
    from csps.server.run import serve

    from csps.cli_args import engine_kwargs

    kw = engine_kwargs(a)
    if torchrun_worker_rank():  # no API server here: this rank serves rank 0's step plans, then exits
        from csps.llm import create_engine, make_engine_config

        setup_logging(a.log_format, "info")
        create_engine(make_engine_config(**{k: v for k, v in kw.items() if k != "max_model_len"}),
                      max_model_len=kw.get("max_model_len"))
        return 0  # not reached: the worker exits the process when rank 0 shuts down
    kw["max_waiting"] = a.max_waiting
    cfg = ServerConfig(engine_kwargs=kw, host=a.host, port=a.port, api_key=a.api_key,
                       served_model_name=a.served_model_name, max_body_bytes=a.max_body_bytes,
                       max_waiting=a.max_waiting, drain_timeout_s=a.drain_timeout,
                       engine_start_timeout_s=a.engine_start_timeout,
                       summarize_concurrency=a.summarize_concurrency, access_log=a.access_log,
                       allowed_origins=tuple(a.allowed_origins), metrics_compat=a.metrics_compat,
                       log_format=a.log_format, sse_keepalive_interval_s=a.sse_keepalive_interval,
                       fim_template=a.fim_template, grammar_compile_timeout_s=a.grammar_compile_timeout)
    setup_logging(cfg.log_format, cfg.log_level)
    return serve(cfg)
