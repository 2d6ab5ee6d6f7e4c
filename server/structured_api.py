"""Request shapes of structured outputs and tool calls (OpenAI's ``response_format``, ``tools``,
``tool_choice`` and assistant ``tool_calls``; vLLM's ``structured_outputs``), and their translation
into the one grammar spec the engine compiles (``csps.core.structured_outputs.StructuredOutputs``).

Only shapes are checked here (in the API process, no torch, no llguidance); whether a schema, regex or
grammar compiles is decided by the engine process, which answers 400 naming the field and the problem.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from csps.core.structured_outputs import StructuredOutputs
from csps.errors import RequestError
from csps.server import schema_rules
from csps.server.errors import bad_request

NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's rule for schema and function names

# what a function without 'parameters' takes (OpenAI: an empty parameter list)
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class JsonSchemaFormat(Strict):
    name: str = Field(..., pattern=NAME_PATTERN)
    description: str | None = None
    schema_: Union[dict, bool, None] = Field(None, alias="schema", description="a JSON Schema (default: any JSON)")
    strict: bool | None = Field(None, description="accepted; the schema is always enforced")


class ResponseFormat(Strict):
    model_config = ConfigDict(extra="forbid", json_schema_extra=schema_rules.response_format)

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type 'json_schema' needs a 'json_schema' object")
        if self.type != "json_schema" and self.json_schema is not None:
            raise ValueError(f"'json_schema' is only allowed with type 'json_schema', not {self.type!r}")
        return self


class StructuredOutputsRequest(Strict):
    """vLLM's ``structured_outputs``: exactly one of these."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=schema_rules.structured_outputs)

    json_: Union[dict, bool, str, None] = Field(None, alias="json", description="a JSON Schema (object or its JSON text)")
    regex: str | None = Field(None, description="the whole output matches this regular expression (Rust regex syntax)")
    choice: list[str] | None = Field(None, min_length=1, description="the output is exactly one of these strings")
    grammar: str | None = Field(None, description="a context-free grammar: Lark-style EBNF ('start: ...') or "
                                                  "llama.cpp GBNF ('root ::= ...')")
    json_object: bool | None = Field(None, description="true: any JSON object")

    @model_validator(mode="after")
    def _one(self):
        given = [k for k in ("json_", "regex", "choice", "grammar") if getattr(self, k) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ValueError("give exactly one of json, regex, choice, grammar or json_object")
        return self


class FunctionDef(Strict):
    name: str = Field(..., pattern=NAME_PATTERN)
    description: str | None = None
    parameters: dict | None = Field(None, description="a JSON Schema of the arguments (default: none)")
    strict: bool | None = Field(None, description="accepted; with tool_choice 'required' or a named function "
                                                  "the arguments always match 'parameters'")


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Union[Literal["none", "auto", "required"], NamedToolChoice]


class FunctionCall(Strict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


# -- translation -------------------------------------------------------------------------------------
def _spec(make, *args) -> dict:
    try:
        return asdict(make(*args))
    except RequestError as e:
        raise bad_request(str(e), param=e.param) from None


def response_format_spec(rf: ResponseFormat | None) -> dict | None:
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_object":
        return _spec(StructuredOutputs.json_object, "response_format")
    schema = rf.json_schema.schema_
    return _spec(StructuredOutputs.json_schema, True if schema is None else schema, "response_format.json_schema.schema")


def structured_outputs_spec(so: StructuredOutputsRequest | None) -> dict | None:
    if so is None:
        return None
    if so.json_ is not None:
        return _spec(StructuredOutputs.json_schema, so.json_, "structured_outputs.json")
    if so.regex is not None:
        return _spec(StructuredOutputs, "regex", so.regex, "structured_outputs.regex")
    if so.choice is not None:
        return _spec(StructuredOutputs.choice, so.choice, "structured_outputs.choice")
    if so.grammar is not None:
        return _spec(StructuredOutputs, "grammar", so.grammar, "structured_outputs.grammar")
    return _spec(StructuredOutputs.json_object, "structured_outputs.json_object")


def output_spec(response_format: ResponseFormat | None, structured: StructuredOutputsRequest | None) -> dict | None:
    """The grammar asked for by response_format or structured_outputs (not both)."""
    a, b = response_format_spec(response_format), structured_outputs_spec(structured)
    if a is not None and b is not None:
        raise bad_request("give either response_format or structured_outputs, not both", param="structured_outputs")
    return a or b


def tool_parameters(tool: Tool) -> dict:
    return tool.function.parameters if tool.function.parameters is not None else NO_PARAMETERS


def tool_mode(tools: list[Tool] | None, choice: ToolChoice | None) -> str | None:
    """None (no tools in play), 'auto', 'required' or the name of the function to call."""
    if not tools:
        if choice not in (None, "none"):
            raise bad_request("tool_choice needs 'tools'", param="tool_choice")
        return None
    if choice is None or choice == "auto":
        return "auto"
    if choice == "none":
        return None
    if choice == "required":
        return "required"
    names = [t.function.name for t in tools]
    if choice.function.name not in names:
        raise bad_request(f"tool_choice names the function {choice.function.name!r}, which is not among the tools "
                          f"({', '.join(names)})", param="tool_choice.function.name")
    return choice.function.name


def tools_spec(tools: list[Tool], mode: str, parallel: bool | None) -> dict | None:
    """The grammar of a forced call: for a named function its arguments object (the name is known); for
    'required' a JSON array of {"name", "arguments"} calls of the given tools (one call unless
    parallel_tool_calls is true or unset)."""
    if mode == "auto":
        return None
    by_name = {t.function.name: t for t in tools}
    if len(by_name) != len(tools):
        raise bad_request("two tools have the same function name", param="tools")
    if mode != "required":
        return _spec(StructuredOutputs.json_schema, tool_parameters(by_name[mode]),
                     f"tools.{tools.index(by_name[mode])}.function.parameters")
    calls = [{"type": "object", "properties": {"name": {"const": t.function.name}, "arguments": tool_parameters(t)},
              "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
    array = {"type": "array", "items": calls[0] if len(calls) == 1 else {"anyOf": calls}, "minItems": 1}
    if parallel is False:
        array["maxItems"] = 1
    return _spec(StructuredOutputs.json_schema, array, "tools")


def tool_dicts(tools: list[Tool]) -> list[dict]:
    """Tools as chat templates take them (OpenAI's shape, with 'parameters' always present)."""
    return [{"type": "function", "function": {**t.function.model_dump(exclude_none=True, exclude={"strict"}),
                                              "parameters": tool_parameters(t)}} for t in tools]


def assistant_tool_calls(calls: list[ToolCall]) -> list[dict]:
    """Assistant tool calls as chat templates take them: arguments as an object where they are JSON."""
    out = []
    for c in calls:
        try:
            args = json.loads(c.function.arguments)
        except json.JSONDecodeError:
            args = c.function.arguments
        out.append({"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": args}})
    return out
