"""A pure ASGI middleware (no BaseHTTPMiddleware: it would break streaming and disconnect detection)
for what applies to every request: the API key, the body size limit, and refusing work while draining."""

from __future__ import annotations

import hmac

from csps.server.errors import APIError

# never need the API key: probes, metrics, and the API's documentation (/docs loads /openapi.json)
OPEN_PATHS = ("/health", "/metrics", "/ping", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc")


class GuardMiddleware:
    def __init__(self, app, api_key: str | None, max_body_bytes: int, is_draining, on_error=None) -> None:
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.is_draining = is_draining
        self.on_error = on_error or (lambda status: None)

    async def reject(self, send, err: APIError) -> None:
        self.on_error(err.status)
        resp = err.response()
        await send({"type": "http.response.start", "status": resp.status_code, "headers": resp.raw_headers})
        await send({"type": "http.response.body", "body": resp.body})

    def authorized(self, scope) -> bool:
        if self.api_key is None or scope["path"] in OPEN_PATHS:
            return True
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())
        return False

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not self.authorized(scope):
            await self.reject(send, APIError(401, "invalid or missing API key: send the header "
                                                  "'Authorization: Bearer <key>'", code="invalid_api_key"))
            return
        if self.is_draining() and scope["path"] not in OPEN_PATHS:
            await self.reject(send, APIError(503, "the server is shutting down", code="shutting_down"))
            return
        limit = self.max_body_bytes
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await self.reject(send, too_large(int(value), limit))
                return
        received = 0

        async def limited_receive():
            nonlocal received
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > limit:
                    raise too_large(received, limit)
            return msg

        await self.app(scope, limited_receive, send)


def too_large(num_bytes: int, limit: int) -> APIError:
    return APIError(413, f"the request body is too large ({num_bytes} bytes or more); this server accepts at most "
                         f"{limit} bytes (--max-body-bytes)", code="request_too_large")
