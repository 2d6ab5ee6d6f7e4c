"""``X-Request-Id``: taken from the request (or generated), echoed on the response, and put on every log
line written while the request is handled (a context variable that the log filter reads).

A pure ASGI middleware, like ``GuardMiddleware``: it runs outermost, so errors raised by the inner
middleware (401, 413, 503) carry the id as well.
"""

from __future__ import annotations

import contextvars
import logging
import re
import uuid

HEADER = b"x-request-id"
MAX_LEN = 128
VALID = re.compile(r"[\x21-\x7e]+")  # visible ASCII: safe in headers and log lines

current_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("csps_request_id", default=None)


def new_request_id() -> str:
    return uuid.uuid4().hex


def request_id_of(scope) -> str:
    """The client's X-Request-Id if it is usable (visible ASCII, at most 128 characters), else a new one."""
    for name, value in scope["headers"]:
        if name == HEADER:
            text = value.decode("latin-1").strip()
            if len(text) <= MAX_LEN and VALID.fullmatch(text):
                return text
            break
    return new_request_id()


class RequestIdMiddleware:
    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id_of(scope)
        scope.setdefault("state", {})["request_id"] = rid
        token = current_request_id.set(rid)

        async def send_with_id(msg):
            if msg["type"] == "http.response.start":
                headers = [(k, v) for k, v in msg.get("headers", []) if k.lower() != HEADER]
                msg = {**msg, "headers": headers + [(HEADER, rid.encode("latin-1"))]}
            await send(msg)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            current_request_id.reset(token)


class RequestIdFilter(logging.Filter):
    """Sets ``record.request_id`` (None outside requests) for the formatters."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = current_request_id.get()
        return True
