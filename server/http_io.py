"""Reading request bodies strictly (UTF-8, JSON, schema) and the plumbing of SSE and disconnects."""

from __future__ import annotations

import asyncio
import json
from typing import TypeVar

from csps.server.errors import APIError, bad_request, describe_validation_error
from csps.server.sse_keepalive import with_keepalive
from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)

SSE_DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def decode_utf8(raw: bytes, what: str = "request body") -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad_request(f"the {what} is not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})",
                          code="invalid_utf8") from None


async def parse_json(request: Request, model: type[M]) -> M:
    """The body as ``model``: 400 for invalid UTF-8, malformed JSON or a bad field (413 is enforced
    while the body is read, see ``csps.server.middleware``)."""
    raw = await request.body()
    if not raw.strip():
        raise bad_request("the request body is empty: send a JSON object", code="invalid_json")
    text = decode_utf8(raw)
    try:
        obj = json.loads(text, parse_float=json_number)
    except json.JSONDecodeError as e:
        raise bad_request(f"malformed JSON in the request body: {e.msg} at line {e.lineno} column {e.colno}",
                          code="invalid_json") from None
    if not isinstance(obj, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(obj).__name__}", code="invalid_json")
    return validate(model, obj)


def json_number(literal: str) -> int | float:
    """A JSON number with a fraction or exponent: integral values (5.0, 1e3) as ints, since JSON Schema's
    'integer' (and so the OpenAPI schema) counts them as integers; float fields take ints as well."""
    value = float(literal)
    return int(value) if value.is_integer() else value


def validate(model: type[M], obj: dict, strict: bool = True) -> M:
    """Strict for JSON (no '5' for 5, no 0 for false: what the OpenAPI schema says); form fields are
    strings, so multipart bodies are validated with pydantic's conversions (strict=False)."""
    try:
        return model.model_validate(obj, strict=strict)
    except ValidationError as e:
        raise describe_validation_error(e) from None


def sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


async def wait_disconnect(request: Request) -> None:
    """Return when the client hangs up (call only after the body has been read)."""
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


class ClientGone(Exception):
    pass


async def unless_disconnected(request: Request, coro):
    """Run ``coro``; cancel it (its ``finally`` blocks abort engine work) if the client disconnects."""
    task = asyncio.ensure_future(coro)
    watcher = asyncio.ensure_future(wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, Exception):  # noqa: BLE001 - the client is gone anyway
            pass
        raise ClientGone()
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()


def gone_response() -> JSONResponse:
    return APIError(499, "client closed the request", code="client_closed").response()


class EngineStream(StreamingResponse):
    """An SSE response that always runs ``on_close`` (e.g. abort the engine requests), also when the
    client disconnects before the body iterator has started, and that sends a keepalive comment whenever
    nothing was sent for the server's ``--sse-keepalive-interval`` (from the moment the request was accepted)."""

    def __init__(self, content, on_close) -> None:
        super().__init__(content, media_type="text/event-stream", headers=SSE_HEADERS)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        interval_s = scope["app"].state.cfg.sse_keepalive_interval_s
        if interval_s > 0:
            self.body_iterator = with_keepalive(self.body_iterator, interval_s)
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()
