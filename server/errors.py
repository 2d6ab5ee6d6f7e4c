"""HTTP errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

from fastapi.responses import JSONResponse

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """Raised anywhere in a handler; rendered as OpenAI-shaped JSON with the given status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def engine_unavailable(message: str, code: str) -> APIError:
    return APIError(503, message, code=code, headers={"Retry-After": "5"})


def describe_validation_error(exc) -> APIError:
    """The first problem of a pydantic ValidationError as one clear 400."""
    err = exc.errors(include_url=False)[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    # drop pydantic's union-branch labels ("str", "list[int]", "function-after[...]") from the path
    loc = [p for p in loc if not (p.startswith(("list[", "function-", "tagged-")) or p in ("str", "int", "float"))]
    param = ".".join(loc) or None
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        return bad_request(f"unrecognized request argument: '{param}'", param=param, code="unknown_parameter")
    if kind == "missing":
        return bad_request(f"'{param}' is required", param=param, code="missing_required_parameter")
    got = err.get("input")
    shown = repr(got) if isinstance(got, (int, float, str, bool)) or got is None else type(got).__name__
    if isinstance(got, str) and len(shown) > 60:
        shown = shown[:57] + "...'"
    msg = err.get("msg", "invalid value")
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    where = f"'{param}': " if param else ""
    return bad_request(f"{where}{msg} (got {shown})", param=param)
