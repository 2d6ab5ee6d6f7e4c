"""The FastAPI application: wiring (engine client, metrics, middleware, error shape) and the small
endpoints: /v1/models, /health, /metrics, /stats, /tokenize, /detokenize."""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from csps.server import llama_api, openai_api, openapi, summarize_api
from csps.server.config import ServerConfig
from csps.server.engine_client import READY, EngineClient
from csps.server.errors import APIError, describe_validation_error
from csps.server.http_io import parse_json
from csps.server.metrics import ServerMetrics
from csps.server.metrics_vllm import VllmMetrics
from csps.server.middleware import OPEN_PATHS, GuardMiddleware
from csps.server.openai_api import check_model
from csps.server.llama_protocol import InfillRequest, LlamaCompletionRequest
from csps.server.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, SummarizeRequest,
                                  TokenizeRequest)
from csps.server.request_id import RequestIdMiddleware
from csps.server.summarize import max_summary_tokens

log = logging.getLogger("csps.server")


class ServerState:
    """Flags shared by the app and the process that runs it (draining on SIGTERM, startup failure)."""

    def __init__(self) -> None:
        self.draining = False
        self.startup_error: str | None = None
        self.on_ready = None  # callback(info) when the engine is up
        self.on_fatal = None  # callback(reason) when the engine fails before it was ever ready


def create_app(cfg: ServerConfig, run_state: ServerState | None = None) -> FastAPI:
    run_state = run_state or ServerState()
    metrics = ServerMetrics(cfg.model_name)
    if cfg.metrics_compat == "vllm":
        metrics.mirrors.append(VllmMetrics(cfg.model_name, metrics.registry))
    client = EngineClient(cfg)
    client.on_output = metrics.observe_outputs
    client.on_abort = lambda n: metrics.aborted.labels(cfg.model_name).inc(n)

    schema_limits: dict = {}  # what the OpenAPI schema needs from the running engine

    async def watch_startup() -> None:
        await client.ready_event.wait()
        if client.state == READY:
            if run_state.on_ready is not None:  # the ready line first: /health already says 200
                run_state.on_ready(client.info)
            try:
                summary_max = await max_summary_tokens(client, client.info["max_model_len"])
            except APIError:
                summary_max = None
            # the engine's info names the model too; the schema needs the name clients use
            schema_limits.update({**client.info, "model_name": cfg.model_name, "summary_max_tokens": summary_max})
        else:
            run_state.startup_error = client.reason
            if run_state.on_fatal is not None:
                run_state.on_fatal(client.reason)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await client.start()
        watcher = asyncio.create_task(watch_startup())
        yield
        watcher.cancel()
        await client.shutdown()

    app = FastAPI(title="csps", version="0.1.0", lifespan=lifespan)
    app.state.cfg = cfg
    app.state.client = client
    app.state.metrics = metrics
    app.state.run = run_state
    app.include_router(openai_api.router)
    app.include_router(summarize_api.router)
    app.include_router(llama_api.router)

    def count_error(status: int) -> None:
        metrics.http_errors.labels(cfg.model_name, str(status)).inc()

    # the last added runs first: request id (on every response and log line), CORS (answers preflights
    # before the API key is checked, and adds its headers to 401s too), then the guard
    app.add_middleware(GuardMiddleware, api_key=cfg.api_key, max_body_bytes=cfg.max_body_bytes,
                       is_draining=lambda: run_state.draining, on_error=count_error)
    if cfg.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cfg.allowed_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-Id"],
                           expose_headers=["X-Request-Id", "Retry-After"], max_age=600)
    app.add_middleware(RequestIdMiddleware)

    def engine_limits() -> dict | None:
        return schema_limits if client.state == READY and schema_limits else None

    openapi.install(app, [CompletionRequest, ChatCompletionRequest, TokenizeRequest, DetokenizeRequest,
                          SummarizeRequest, InfillRequest, LlamaCompletionRequest], api_key=cfg.api_key is not None, open_paths=OPEN_PATHS,
                    engine_limits=engine_limits)

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError):
        count_error(exc.status)
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        return await on_api_error(request, describe_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        messages = {404: f"no such endpoint: {request.method} {request.url.path}",
                    405: f"method {request.method} is not allowed on {request.url.path}"}
        msg = messages.get(exc.status_code, str(exc.detail))
        # keep Starlette's headers (a 405's Allow lists the methods the path takes)
        return await on_api_error(request, APIError(exc.status_code, msg, headers=dict(exc.headers or {})))

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception):
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return await on_api_error(request, APIError(500, f"internal server error: {type(exc).__name__}: {exc}",
                                                    code="internal_error"))

    @app.get("/health")
    async def health():
        status, body = client.health()
        if run_state.draining:
            status, body["status"] = 503, "draining"
        return JSONResponse(body, status_code=status)

    @app.get("/ping")
    async def ping():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        info = client.info
        return {"object": "list", "data": [{
            "id": cfg.model_name, "object": "model", "created": int(client.started_wall_s), "owned_by": "csps",
            "root": cfg.engine_kwargs["model"], "max_model_len": info.get("max_model_len")}]}

    async def fresh_stats() -> dict:
        if client.state != READY:
            return {}
        try:
            client.last_stats = await client.rpc("stats", timeout_s=5.0)
        except APIError:
            pass  # a long step: fall back to the last heartbeat's numbers
        return client.last_stats

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus_metrics():
        metrics.set_stats(await fresh_stats(), client.state == READY)
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/stats")
    async def stats():
        client.check_available()
        return {"model": cfg.model_name, "engine": client.info, "stats": await fresh_stats(),
                "uptime_s": time.monotonic() - client.started_s}

    @app.post("/tokenize", openapi_extra=openapi.body(TokenizeRequest))
    async def tokenize(request: Request):
        req = await parse_json(request, TokenizeRequest)
        check_model(request, req.model)
        args = {"return_token_strs": req.return_token_strs}
        if req.messages is not None:
            args["messages"] = [{"role": m.role, "content": m.text()} for m in req.messages]
        else:
            args["text"] = req.prompt
        out = await client.rpc("tokenize", **args)
        body = {"count": len(out["tokens"]), "max_model_len": client.info["max_model_len"], "tokens": out["tokens"]}
        if "token_strs" in out:
            body["token_strs"] = out["token_strs"]
        return body

    @app.post("/detokenize", openapi_extra=openapi.body(DetokenizeRequest))
    async def detokenize(request: Request):
        req = await parse_json(request, DetokenizeRequest)
        check_model(request, req.model)
        return {"prompt": (await client.rpc("detokenize", tokens=req.tokens))["text"]}

    return app
