"""``/openapi.json`` (and ``/docs``): every endpoint's request body and error responses, from the pydantic
models the handlers validate with.

The handlers read their bodies themselves (``http_io.parse_json``: strict UTF-8 and JSON, 400 in OpenAI's
error shape), so FastAPI cannot infer the bodies; each route names its model with ``body(Model)`` and
the models' JSON schemas are added to ``components.schemas`` here. Limits that only the running engine
knows (the served model name, the context length, the vocabulary) are filled into the schema once the
engine is ready, so the schema promises only what the server accepts.
"""

from __future__ import annotations

import copy

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

REF = "#/components/schemas/{model}"

ERROR_SCHEMA = {
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["message", "type", "param", "code"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        "code": {"anyOf": [{"type": "string"}, {"type": "null"}]}}}},
}
# with "stream": true: server-sent events, each 'data:' a JSON chunk (or an error object), the last '[DONE]'
SSE_EVENT = {"type": "object", "properties": {"data": {"type": "string"}}}
ERROR_DESCRIPTIONS = {
    "400": "Invalid request (OpenAI's error shape)", "401": "Missing or wrong API key",
    "404": "No such model", "413": "Request body too large", "429": "Engine queue full (see Retry-After)",
    "500": "Internal error", "503": "Engine starting, dead, or server draining (see Retry-After)",
}


def body(model: type[BaseModel], *, multipart: dict | None = None, streams: bool = False) -> dict:
    """``openapi_extra`` for a route that validates its JSON body with ``model`` (optionally also a
    multipart form, and a text/event-stream response when ``stream`` is true)."""
    content = {"application/json": {"schema": {"$ref": REF.format(model=model.__name__)}}}
    if multipart is not None:
        content["multipart/form-data"] = {"schema": multipart}
    extra: dict = {"requestBody": {"required": True, "content": content}, "x-csps-body-model": model.__name__}
    if streams:
        extra["x-csps-streams"] = True
    return extra


def _error_responses(statuses: list[str]) -> dict:
    ref = {"$ref": REF.format(model="ErrorResponse")}
    return {s: {"description": ERROR_DESCRIPTIONS[s], "content": {"application/json": {"schema": ref}}}
            for s in statuses}


def build_schema(app: FastAPI, models: list[type[BaseModel]], *, api_key: bool, open_paths: tuple[str, ...],
                 limits: dict | None) -> dict:
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    _, defs = models_json_schema([(m, "validation") for m in models], ref_template=REF)
    components = schema.setdefault("components", {})
    components.setdefault("schemas", {}).update(copy.deepcopy(defs.get("$defs", {})))
    components["schemas"]["ErrorResponse"] = ERROR_SCHEMA
    if api_key:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    for path, ops in schema.get("paths", {}).items():
        for op in ops.values():
            statuses = ["404", "413", "500", "503"]
            if op.pop("x-csps-body-model", None) is not None:
                statuses = ["400", "429"] + statuses
            ok = op.setdefault("responses", {}).setdefault("200", {"description": "Successful Response"})
            if op.pop("x-csps-streams", False):
                ok.setdefault("content", {})["text/event-stream"] = {"schema": SSE_EVENT}
            op["responses"].pop("422", None)  # validation errors are 400s here
            if api_key and path not in open_paths:
                op["security"] = [{"bearer": []}]
                statuses.append("401")
            op["responses"].update(_error_responses(sorted(statuses)))
    if limits:
        apply_limits(components["schemas"], limits)
    return schema


def _set_in_any_of(prop: dict, kind: str, **keywords) -> None:
    """Add JSON-schema keywords to the branch of ``prop`` (or its anyOf) of type ``kind``."""
    for branch in prop.get("anyOf", [prop]):
        if branch.get("type") == kind:
            branch.update(keywords)


def apply_limits(schemas: dict, limits: dict) -> None:
    """What the engine knows: the one model name it serves, the context length, the vocabulary."""
    model_prop = {"anyOf": [{"type": "string", "enum": [limits["model_name"]]}, {"type": "null"}],
                  "description": "the served model (see /v1/models); null: the same"}
    room = max(1, limits["max_model_len"] - 1)
    for name, s in schemas.items():
        props = s.get("properties", {})
        if "model" in props:
            props["model"] = {**model_prop, "default": None}
        for key in ("max_tokens", "max_completion_tokens", "n_predict"):  # (summarize's chunk_max_tokens is capped)
            if key in props and name != "SummarizeRequest":
                _set_in_any_of(props[key], "integer", maximum=room)
                props[key]["description"] = (f"at most {room}; the prompt's tokens plus {key} must fit the "
                                             f"context of {limits['max_model_len']} tokens (else 400); 0: prefill "
                                             "only (the prompt is computed into the prefix cache)")
        if name == "SummarizeRequest" and limits.get("summary_max_tokens"):
            top = limits["summary_max_tokens"]
            props["max_tokens"].update(maximum=top, description="the summary's length; with the default instructions at most "
                                                   f"{top} tokens (longer instructions leave less room)")
        if name == "CompletionRequest" and not limits.get("has_fim"):
            props["suffix"] = {"type": "null", "default": None,
                               "description": "fill-in-the-middle: this model's tokenizer has no FIM tokens"}
        if name == "InfillRequest":
            s["description"] = (f"fill-in-the-middle with the '{limits['fim']}' template" if limits.get("has_fim") else
                                "this model's tokenizer has no FIM tokens: /infill answers 400")
    token = {"type": "integer", "minimum": 0, "maximum": limits["vocab_size"] - 1}
    for name, key in (("DetokenizeRequest", "tokens"), ("CompletionRequest", "prompt"),
                      ("LlamaCompletionRequest", "prompt")):
        _set_token_items(schemas.get(name, {}).get("properties", {}).get(key), token)


def _set_token_items(prop: dict | None, token: dict) -> None:
    if prop is None:
        return
    for branch in prop.get("anyOf", [prop]):
        items = branch.get("items")
        if branch.get("type") != "array" or not isinstance(items, dict):
            continue
        if items.get("type") == "integer":
            items.update(token)
        elif items.get("type") == "array" and items.get("items", {}).get("type") == "integer":
            items["items"].update(token)


def install(app: FastAPI, models: list[type[BaseModel]], *, api_key: bool, open_paths: tuple[str, ...],
            engine_limits) -> None:
    """Serve the schema above as app.openapi() (FastAPI's documented way to extend it), cached once the
    engine's limits are known. ``engine_limits() -> dict | None``."""
    cache: dict = {}

    def openapi() -> dict:
        if "schema" in cache:
            return cache["schema"]
        limits = engine_limits()
        schema = build_schema(app, models, api_key=api_key, open_paths=open_paths, limits=limits)
        if limits:
            cache["schema"] = schema
        return schema

    app.openapi = openapi
