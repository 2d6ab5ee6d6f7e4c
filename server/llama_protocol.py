"""Request schemas of llama.cpp server's native endpoints, ``POST /completion`` and ``POST /infill``.

Field names and defaults are llama.cpp's (``n_predict`` -1 = until the context is full, 0 = evaluate the
prompt into the cache only; temperature 0.8, top_k 40, top_p 0.95, min_p 0.05; seed -1 = random), so
coding assistants written for llama.cpp (llama.vscode, Continue's llama.cpp provider) work unchanged.
Unknown fields are refused as elsewhere; llama.cpp's samplers that csps lacks are accepted only at
their "disabled" value, with a 400 that names them otherwise. Accepted and ignored, since csps serves
them by design: ``cache_prompt`` (the prefix cache is always on), ``samplers`` (csps applies penalties,
temperature, top-k, top-p, min-p in that order), ``t_max_prompt_ms`` (a prefill is never cut short).
"""

from __future__ import annotations

from typing import Union

from pydantic import ConfigDict, Field, model_validator

from csps.server import schema_rules
from csps.server.protocol import Strict

# llama.cpp options csps does not implement, with the value that means "off" (accepted)
UNSUPPORTED_UNLESS = {"mirostat": 0, "typical_p": 1.0, "n_probs": 0, "dynatemp_range": 0.0, "xtc_probability": 0.0,
                      "dry_multiplier": 0.0}


class LlamaSampling(Strict):
    """Fields shared by /completion and /infill."""

    model: str | None = None
    n_predict: int = Field(-1, ge=-1)  # -1: until EOS or the context is full; 0: prefill only (a warm-up)
    temperature: float = Field(0.8, ge=0)
    top_k: int = Field(40, ge=-1)  # 0 or -1: off
    top_p: float = Field(0.95, gt=0, le=1)
    min_p: float = Field(0.05, ge=0, le=1)
    seed: int = Field(-1, ge=-1, lt=2**63)  # -1: random
    stop: Union[str, list[str], None] = None
    repeat_penalty: float = Field(1.0, gt=0)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    ignore_eos: bool = False
    stream: bool = False
    return_progress: bool = False  # streamed: prompt_progress chunks during the prefill
    return_tokens: bool = False  # the generated token ids in 'tokens' (always on streamed chunks)
    n_indent: int = Field(0, ge=0)  # stop at a line indented less than this (after the first line)
    t_max_predict_ms: int = Field(0, ge=0)  # stop at a newline once generating took longer (0: off)
    response_fields: list[str] | None = None  # only these fields ('timings/prompt_n' unnests) in the response
    cache_prompt: bool = True  # accepted: the prefix cache is always on
    samplers: Union[list[str], str, None] = None  # accepted: csps's sampler order is fixed
    t_max_prompt_ms: int = Field(0, ge=0)  # accepted: a prefill is never cut short
    # llama.cpp's samplers that csps lacks: only their "off" value
    mirostat: int = 0
    typical_p: float = 1.0
    n_probs: int = 0
    dynatemp_range: float = 0.0
    xtc_probability: float = 0.0
    dry_multiplier: float = 0.0

    @model_validator(mode="after")
    def _check(self):
        for name, off in UNSUPPORTED_UNLESS.items():
            if getattr(self, name) != off:
                raise ValueError(f"{name} is not supported by this server (only {off}, its 'off' value)")
        if self.return_progress and not self.stream:
            raise ValueError("return_progress is only allowed when stream is true")
        if isinstance(self.stop, list) and any(not s for s in self.stop) or self.stop == "":
            raise ValueError("stop strings must not be empty")
        return self

    @property
    def max_tokens(self) -> int | None:
        return None if self.n_predict < 0 else self.n_predict

    def sampling_fields(self) -> dict:
        """SamplingParams fields (checked by SamplingParams in the engine process, like the OpenAI ones)."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or ())
        return {"max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "top_k": max(0, self.top_k), "min_p": self.min_p, "seed": None if self.seed < 0 else self.seed,
                "stop": stop, "stop_token_ids": [], "repetition_penalty": self.repeat_penalty,
                "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
                "logprobs": None, "ignore_eos": self.ignore_eos, "include_stop_str_in_output": False}

    def settings(self) -> dict:
        """``generation_settings`` of the response: what was applied."""
        return {"n_predict": self.n_predict, "temperature": self.temperature, "top_k": max(0, self.top_k),
                "top_p": self.top_p, "min_p": self.min_p, "seed": self.seed, "stop": self.sampling_fields()["stop"],
                "repeat_penalty": self.repeat_penalty, "presence_penalty": self.presence_penalty,
                "frequency_penalty": self.frequency_penalty, "ignore_eos": self.ignore_eos, "stream": self.stream,
                "n_indent": self.n_indent, "t_max_predict_ms": self.t_max_predict_ms, "cache_prompt": True}


def _schema(schema: dict) -> None:
    schema_rules.llama(schema, UNSUPPORTED_UNLESS)


def _completion_schema(schema: dict) -> None:
    _schema(schema)
    schema["properties"]["prompt"]["anyOf"] = [{"type": "string", "minLength": 1}, {"type": "array", "minItems": 1,
                                                                    "items": {"type": "integer"}}]


class LlamaCompletionRequest(LlamaSampling):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_completion_schema)

    prompt: Union[str, list[int]]

    def prompt_spec(self) -> dict:
        return {"text": self.prompt} if isinstance(self.prompt, str) else {"ids": list(self.prompt)}


class ExtraFile(Strict):
    """One file (or a chunk of one) of repository context."""

    text: str
    filename: str = ""
    time: float | None = None  # accepted: llama.vscode sends when it picked the chunk


class InfillRequest(LlamaSampling):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_schema)

    input_prefix: str = ""  # the code before the cursor
    input_suffix: str = ""  # the code after the cursor
    input_extra: list[ExtraFile] = Field(default_factory=list)  # repository context, oldest first
    prompt: str = ""  # after the FIM middle marker (what is typed at the cursor)

    def prompt_spec(self) -> dict:
        return {"fim": {"prefix": self.input_prefix, "suffix": self.input_suffix, "middle": self.prompt,
                        "extra": [[f.filename, f.text] for f in self.input_extra]}}
