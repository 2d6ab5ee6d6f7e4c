"""The request rules that pydantic's field types do not show, written into the models' JSON schemas, so
``/openapi.json`` promises exactly what the validators accept (a schema-driven client or fuzzer then
generates only requests the server takes). Each function is a model's ``json_schema_extra``; the rule it
documents is enforced next to it in ``csps.server.protocol`` (a model validator or the handler).
"""

from __future__ import annotations

import re

# a blank document holds nothing but ASCII whitespace (a class that Python and ECMA-262 regexes agree on)
NOT_BLANK = r"[^\t\n\x0b\x0c\r ]"


def is_blank(text: str) -> bool:
    return re.search(NOT_BLANK, text) is None


def _if_set_then(field: str, kind: str, then: dict) -> dict:
    return {"if": {"required": [field], "properties": {field: {"type": kind}}}, "then": then}


def _rules(schema: dict, *rules: dict) -> None:
    schema.setdefault("allOf", []).extend(rules)


# a message that says something: 'content' a non-empty string, or parts of which one has non-empty text
HAS_TEXT = {"required": ["content"], "properties": {"content": {"anyOf": [
    {"type": "string", "minLength": 1},
    {"type": "array", "contains": {"properties": {"text": {"type": "string", "minLength": 1}}}}]}}}


STREAMING = {"required": ["stream"], "properties": {"stream": {"const": True}}}
# return_progress: true only with stream: true
PROGRESS_NEEDS_STREAM = {"if": {"required": ["return_progress"], "properties": {"return_progress": {"const": True}}},
                         "then": STREAMING}


def sampling(schema: dict) -> None:
    p = schema["properties"]
    p["logit_bias"]["maxProperties"] = 0  # only null or {}: logit_bias is not supported
    p["stop"].update(minLength=1, items={"type": "string", "minLength": 1})  # no empty stop strings
    # stream_options only with stream: true
    _rules(schema, _if_set_then("stream_options", "object", STREAMING), PROGRESS_NEEDS_STREAM)


def completion(schema: dict) -> None:
    sampling(schema)
    p = schema["properties"]
    p["echo"]["const"] = False
    p["prompt"] = {"title": "Prompt", "description": "text, texts, token ids, or lists of token ids (none of them empty)",
                   "anyOf": [{"type": "string", "minLength": 1},
                             {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
                             {"type": "array", "minItems": 1, "items": {"type": "integer"}},
                             {"type": "array", "minItems": 1,
                              "items": {"type": "array", "minItems": 1, "items": {"type": "integer"}}}]}
    p["best_of"]["anyOf"][0]["maximum"] = 1  # best_of > 1 is not supported (use n)


def chat(schema: dict) -> None:
    sampling(schema)
    p = schema["properties"]
    p["messages"]["contains"] = HAS_TEXT  # at least one message says something
    # tool_choice other than 'none' needs tools
    _rules(schema, {"if": {"required": ["tool_choice"], "properties": {"tool_choice": {
        "not": {"anyOf": [{"type": "null"}, {"const": "none"}]}}}}, "then": {
        "required": ["tools"], "properties": {"tools": {"type": "array", "minItems": 1}}}})
    # top_logprobs only with logprobs: true
    _rules(schema, _if_set_then("top_logprobs", "integer",
                                {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}}))


def response_format(schema: dict) -> None:
    # 'json_schema' exactly with type 'json_schema'
    _rules(schema, {"if": {"properties": {"type": {"const": "json_schema"}}},
                    "then": {"required": ["json_schema"], "properties": {"json_schema": {"type": "object"}}},
                    "else": {"properties": {"json_schema": {"type": "null"}}}})


def structured_outputs(schema: dict) -> None:
    # exactly one of json, regex, choice, grammar, json_object (true)
    schema["minProperties"] = schema["maxProperties"] = 1
    schema["properties"]["json_object"] = {"const": True, "description": "true: any JSON object"}


def tokenize(schema: dict) -> None:
    # exactly one of prompt and messages (the other absent or null)
    schema["oneOf"] = [{"required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
                       {"required": ["messages"], "properties": {"messages": {"type": "array"}}}]


def summarize(schema: dict) -> None:
    schema.setdefault("required", []).append("text")  # a JSON body must hold the document
    schema["properties"]["text"]["pattern"] = NOT_BLANK
    _rules(schema, PROGRESS_NEEDS_STREAM)


def llama(schema: dict, unsupported: dict) -> None:
    """llama.cpp's /completion and /infill: ``unsupported`` samplers only at their 'off' value."""
    p = schema["properties"]
    p["stop"].update(minLength=1, items={"type": "string", "minLength": 1})
    for name, off in unsupported.items():
        p[name]["const"] = off
    _rules(schema, PROGRESS_NEEDS_STREAM)
