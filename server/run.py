"""Running the API process: bind, serve with uvicorn, drain on SIGTERM, report the engine's failures."""

from __future__ import annotations

import contextlib
import logging
import signal
import socket

import uvicorn
from csps.server.app import ServerState, create_app
from csps.server.config import ServerConfig

from csps.errors import CspsError

log = logging.getLogger("csps.server")


class DrainingServer(uvicorn.Server):
    """uvicorn's server, which on SIGTERM/SIGINT stops accepting connections and lets in-flight requests
    finish (up to the drain timeout). Here the first signal also flips the app into 'draining' (503 for
    new requests on open connections), and the process exits normally afterwards instead of re-raising."""

    def __init__(self, config: uvicorn.Config, run_state: ServerState) -> None:
        super().__init__(config)
        self.run_state = run_state

    def handle_exit(self, sig, frame) -> None:
        if not self.should_exit:
            log.info("received %s: draining in-flight requests, then exiting", signal.Signals(sig).name)
        self.run_state.draining = True
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self):
        old = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)


def bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as e:
        raise CspsError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def serve(cfg: ServerConfig) -> int:
    sock = bind(cfg.host, cfg.port)
    host, port = sock.getsockname()[:2]
    run_state = ServerState()
    app = create_app(cfg, run_state)
    config = uvicorn.Config(app, log_config=None, log_level=cfg.log_level, access_log=cfg.access_log,
                            timeout_graceful_shutdown=cfg.drain_timeout_s, timeout_keep_alive=5)
    server = DrainingServer(config, run_state)
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"

    def on_ready(info: dict) -> None:
        log.info("csps serving %s (%s) at %s: layout sp=%d x tp=%d, KV cache %d tokens (%d per rank), "
                 "context %d tokens", cfg.model_name, info["model_name"], url, info["sp"], info["tp"],
                 info["kv_capacity_tokens"], info["kv_capacity_tokens_per_rank"], info["max_model_len"])

    def on_fatal(reason: str) -> None:
        log.error("the engine failed to start: %s", reason)
        server.should_exit = True

    run_state.on_ready, run_state.on_fatal = on_ready, on_fatal
    log.info("csps API listening on %s; the engine is loading %s (503 until it is ready)",
             url, cfg.engine_kwargs["model"])
    server.run(sockets=[sock])
    if run_state.startup_error:
        raise CspsError(f"the engine failed to start: {run_state.startup_error}")
    return 0
