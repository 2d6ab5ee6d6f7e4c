"""StructuredOutputs: the grammar a request's output must match (pure Python, no torch).

The server translates OpenAI's ``response_format``, vLLM's ``structured_outputs`` and ``tool_choice``
into one of these; the engine compiles it once per distinct spec (``csps.engine.grammar``) and masks
every sampled token with it (``csps.engine.structured``). Kinds:

- ``json_schema``: ``spec`` is the JSON text of a JSON Schema (``{"type": "object"}`` for OpenAI's
  ``json_object``);
- ``regex``: ``spec`` is a regular expression the whole output must match (Rust ``regex`` syntax);
- ``choice``: ``spec`` is the JSON text of a list of strings, the output is exactly one of them;
- ``grammar``: ``spec`` is a context-free grammar, Lark-style EBNF (``start: ...``) or llama.cpp's
  GBNF (``root ::= ...``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from csps.errors import RequestError

KINDS = ("json_schema", "regex", "choice", "grammar")
# The longest spec accepted (characters of its JSON text, regex or grammar): a bound on compile time and
# memory; the largest schemas measured here compile in under 1 s (benchmarks/README.md).
MAX_SPEC_CHARS = 1_000_000


@dataclass(frozen=True)
class StructuredOutputs:
    kind: str
    spec: str
    param: str | None = None  # the request field it came from, named in errors

    def __post_init__(self) -> None:
        where = f"{self.param}: " if self.param else ""
        if self.kind not in KINDS:
            raise RequestError(f"{where}unknown structured output kind {self.kind!r} (one of {', '.join(KINDS)})",
                               self.param)
        if not isinstance(self.spec, str) or not self.spec.strip():
            raise RequestError(f"{where}the {self.kind} must not be empty", self.param)
        if len(self.spec) > MAX_SPEC_CHARS:
            raise RequestError(f"{where}the {self.kind} has {len(self.spec):,} characters; at most "
                               f"{MAX_SPEC_CHARS:,} are accepted", self.param)

    @classmethod
    def json_schema(cls, schema, param: str | None = None) -> StructuredOutputs:
        """A JSON Schema given as a dict (or bool), or as its JSON text."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise RequestError(f"{param or 'schema'}: the schema is not valid JSON: {e.msg} at line {e.lineno} "
                                   f"column {e.colno}", param) from None
        if not isinstance(schema, (dict, bool)):
            raise RequestError(f"{param or 'schema'}: a JSON Schema must be an object or a boolean, got "
                               f"{type(schema).__name__}", param)
        return cls("json_schema", json.dumps(schema, ensure_ascii=False, separators=(",", ":")), param)

    @classmethod
    def json_object(cls, param: str | None = None) -> StructuredOutputs:
        return cls.json_schema({"type": "object"}, param)

    @classmethod
    def choice(cls, options, param: str | None = None) -> StructuredOutputs:
        if not isinstance(options, (list, tuple)) or not options or not all(isinstance(o, str) and o for o in options):
            raise RequestError(f"{param or 'choice'}: choice must be a non-empty list of non-empty strings", param)
        return cls("choice", json.dumps(list(options), ensure_ascii=False), param)

    @property
    def key(self) -> tuple[str, str]:
        """What identifies the compiled grammar (the request field is not part of it)."""
        return self.kind, self.spec
