"""Request schemas (pydantic, an OpenAI subset plus vLLM's sampling extensions) and their translation.

Unknown fields are rejected (400 'unrecognized request argument'), so a typo never silently falls
back to a default. Known OpenAI fields that csps does not implement get a 400 that says so.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from csps.errors import RequestError
from csps.core.sampling_params import SamplingParams
from csps.server import schema_rules
from csps.server.errors import bad_request
from csps.server.structured_api import (
    ResponseFormat,
    StructuredOutputsRequest,
    Tool,
    ToolCall,
    ToolChoice,
    assistant_tool_calls,
    output_spec,
    tool_dicts,
    tool_mode,
    tools_spec,
)

MAX_N = 64


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # accepted for vLLM clients; usage is sent once at the end


class SamplingRequest(Strict):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)  # 0: prefill only (a warm-up of the prefix cache)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    return_progress: bool = False  # streamed: chunks with "choices": [] and prompt_progress during the prefill
    stop: Union[str, list[str], None] = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM-style extensions (the openai client sends them through extra_body)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    # structured outputs: OpenAI's response_format, vLLM's structured_outputs (one of them)
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsRequest | None = None

    @model_validator(mode="after")
    def _unsupported(self):
        if self.logit_bias:
            raise ValueError("logit_bias is not supported by this server")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        if self.return_progress and not self.stream:
            raise ValueError("return_progress is only allowed when stream is true")
        if isinstance(self.stop, list) and any(not s for s in self.stop) or self.stop == "":
            raise ValueError("stop strings must not be empty")
        return self

    def sampling_kwargs(self, max_tokens: int | None, logprobs: int | None) -> dict:
        """SamplingParams fields (validated here, rebuilt in the engine process); ``structured_outputs``
        is the grammar's spec (a dict) or None."""
        kw = dict(max_tokens=1 if max_tokens is None else max_tokens,
                  temperature=1.0 if self.temperature is None else self.temperature,
                  top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k or 0,
                  min_p=self.min_p or 0.0, seed=self.seed, stop=self.stop or (),
                  stop_token_ids=tuple(self.stop_token_ids or ()),
                  repetition_penalty=self.repetition_penalty or 1.0, presence_penalty=self.presence_penalty,
                  frequency_penalty=self.frequency_penalty, logprobs=logprobs, ignore_eos=self.ignore_eos,
                  include_stop_str_in_output=self.include_stop_str_in_output,
                  structured_outputs=self.structured_spec())
        try:
            params = asdict(SamplingParams(**kw))
        except RequestError as e:
            raise bad_request(str(e)) from None
        params["stop"] = list(params["stop"])
        params["stop_token_ids"] = list(params["stop_token_ids"])
        params["max_tokens"] = max_tokens  # None: the engine fills in the room left in the context
        return params

    def structured_spec(self) -> dict | None:
        return output_spec(self.response_format, self.structured_outputs)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


PromptType = Union[str, list[str], list[int], list[list[int]]]


class CompletionRequest(SamplingRequest):
    model_config = ConfigDict(extra="forbid", json_schema_extra=schema_rules.completion)

    prompt: PromptType
    suffix: str | None = None
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(16, ge=0)

    @model_validator(mode="after")
    def _check(self):
        if self.echo:
            raise ValueError("echo is not supported by this server")
        if self.best_of is not None and self.best_of != 1:
            raise ValueError("best_of is not supported by this server (use n)")
        return self

    def prompt_specs(self) -> list[dict]:
        """One engine prompt spec per prompt; 400 for empty prompts."""
        p = self.prompt
        if isinstance(p, str):
            items: list = [p]
        elif not p:
            raise bad_request("the prompt is empty", param="prompt", code="empty_prompt")
        elif isinstance(p[0], int):
            items = [p]
        else:
            items = list(p)
        specs = []
        for x in items:
            if not x:
                raise bad_request("the prompt is empty", param="prompt", code="empty_prompt")
            if self.suffix is not None:
                if not isinstance(x, str):
                    raise bad_request("suffix needs a text prompt", param="suffix")
                specs.append({"fim": {"prefix": x, "suffix": self.suffix}})
            else:
                specs.append({"text": x} if isinstance(x, str) else {"ids": list(x)})
        return specs


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: str | None = None
    tool_call_id: str | None = None  # role 'tool': the call it answers
    tool_calls: list[ToolCall] | None = None  # role 'assistant': the calls it made

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingRequest):
    model_config = ConfigDict(extra="forbid", json_schema_extra=schema_rules.chat)

    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None  # default: 'auto' with tools, else 'none'
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs to be true")
        for i, m in enumerate(self.messages):
            if m.tool_calls and m.role != "assistant":
                raise ValueError(f"messages.{i}: only assistant messages carry tool_calls")
        return self

    @property
    def tool_mode(self) -> str | None:
        """None (no tools in play), 'auto', 'required' or the name of the function that must be called."""
        return tool_mode(self.tools, self.tool_choice)

    def structured_spec(self) -> dict | None:
        mode = self.tool_mode
        own = super().structured_spec()
        if mode is not None and own is not None:
            raise bad_request("response_format / structured_outputs cannot be combined with tools; "
                              "set tool_choice to 'none' or drop one", param="tool_choice")
        return own if mode is None else tools_spec(self.tools, mode, self.parallel_tool_calls)

    def chat_messages(self) -> list[dict]:
        msgs = []
        for m in self.messages:
            msg = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            if m.tool_calls:
                msg["tool_calls"] = assistant_tool_calls(m.tool_calls)
            if m.role == "tool" and m.tool_call_id is not None:
                msg["tool_call_id"] = m.tool_call_id
            if m.name is not None and m.role == "tool":
                msg["name"] = m.name
            msgs.append(msg)
        if not any(m["content"] for m in msgs):
            raise bad_request("the messages are empty", param="messages", code="empty_prompt")
        return msgs

    def prompt_spec(self) -> dict:
        """The engine's prompt: the messages, and the tools for the chat template when they are in play."""
        spec = {"messages": self.chat_messages()}
        if self.tool_mode is not None:
            spec["tools"] = tool_dicts(self.tools)
        return spec

    @property
    def completion_max_tokens(self) -> int | None:
        return self.max_tokens if self.max_completion_tokens is None else self.max_completion_tokens


class TokenizeRequest(Strict):
    model_config = ConfigDict(extra="forbid", json_schema_extra=schema_rules.tokenize)

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = True  # accepted for vLLM clients
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        return self


class DetokenizeRequest(Strict):
    model: str | None = None
    tokens: list[int]


class SummarizeRequest(Strict):
    model_config = ConfigDict(extra="forbid", json_schema_extra=schema_rules.summarize)

    model: str | None = None
    text: str = ""
    instructions: str | None = None  # for the final summary (comes after the document)
    chunk_instructions: str | None = None  # for each chunk's summary in map-reduce
    merge_instructions: str | None = None  # for merging summaries (map-reduce levels 2+)
    max_tokens: int = Field(512, ge=1)  # length of the final summary
    chunk_max_tokens: int | None = Field(None, ge=1)  # length of each chunk summary
    chunk_tokens: int | None = Field(None, ge=64)  # force a smaller chunk size (map-reduce only)
    strategy: Literal["auto", "single_pass", "map_reduce"] = "auto"
    temperature: float = Field(0.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    repetition_penalty: float = Field(1.1, gt=0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool = False
    return_progress: bool = False  # streamed: summary.prompt_progress events during the final pass's prefill

    @model_validator(mode="after")
    def _progress_needs_stream(self):
        if self.return_progress and not self.stream:
            raise ValueError("return_progress is only allowed when stream is true")
        return self
