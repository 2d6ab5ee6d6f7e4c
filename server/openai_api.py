"""POST /v1/completions and /v1/chat/completions: OpenAI's request and response shapes, streamed or not."""

from __future__ import annotations

import time

from csps.server.errors import APIError, bad_request
from csps.server.http_io import (
    SSE_DONE,
    ClientGone,
    EngineStream,
    gone_response,
    parse_json,
    sse,
    unless_disconnected,
)
from csps.server.openapi import body
from csps.server.prompt_progress import progress_body
from csps.server.protocol import ChatCompletionRequest, CompletionRequest
from csps.server.tool_calls import ToolCalls
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter()


class Choice:
    """One choice's text, token count, finish reason and logprobs, grown delta by delta."""

    def __init__(self, index: int, want_logprobs: bool) -> None:
        self.index = index
        self.parts: list[str] = []
        self.num_tokens = 0
        self.num_cached = 0
        self.finish_reason: str | None = None
        self.want_logprobs = want_logprobs
        self.lps: list[list] = []  # [token, bytes, logprob, [[token, bytes, logprob], ...]]

    def add(self, it: dict) -> None:
        self.parts.append(it["text"])
        self.num_tokens += len(it["ids"])
        if it.get("lp"):
            self.lps.extend(it["lp"])
        if it["done"]:
            self.finish_reason = "stop" if it["reason"] == "abort" else it["reason"]
            self.num_tokens = it["ng"]
            self.num_cached = it["nc"]

    @property
    def text(self) -> str:
        return "".join(self.parts)


def completion_logprobs(lps: list[list], offset: int = 0) -> dict:
    tokens, token_lps, tops, offsets = [], [], [], []
    for tok, _raw, lp, top in lps:
        tokens.append(tok)
        token_lps.append(lp)
        alternatives: dict[str, float] = {}
        for t, _r, v in top:  # most likely first; tokens that print alike keep the highest
            alternatives.setdefault(t, v)
        tops.append(alternatives)
        offsets.append(offset)
        offset += len(tok)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(lps: list[list]) -> dict:
    return {"content": [{"token": tok, "logprob": lp, "bytes": raw,
                         "top_logprobs": [{"token": t, "logprob": v, "bytes": r} for t, r, v in top]}
                        for tok, raw, lp, top in lps], "refusal": None}


def chat_choice(c: Choice, tools: ToolCalls | None) -> dict:
    message = {"role": "assistant", "content": c.text, "refusal": None}
    finish = c.finish_reason
    if tools is not None:
        message["content"], calls = tools.message(c.text)
        if calls:
            message["tool_calls"] = [{k: v for k, v in call.items() if k != "index"} for call in calls]
        finish = tools.finish_reason(finish, len(calls))
    return {"index": c.index, "message": message, "logprobs": chat_logprobs(c.lps) if c.want_logprobs else None,
            "finish_reason": finish}


def usage(sub, choices: list[Choice], n: int) -> dict:
    prompt = sum(sub.prompt_tokens)
    completion = sum(c.num_tokens for c in choices)
    cached = sum(c.num_cached for c in choices if c.index % n == 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def require_fim(request: Request, what: str, param: str | None) -> None:
    """400 unless the served model has a fill-in-the-middle template (see csps.server.fim)."""
    if not request.app.state.client.info.get("has_fim"):
        raise bad_request(f"{what} needs fill-in-the-middle tokens, and the tokenizer of "
                          f"{request.app.state.cfg.model_name} has none (serve it with --fim-template NAME to "
                          "force a template)", param=param, code="fim_unsupported")


def check_model(request: Request, model: str | None) -> None:
    served = request.app.state.cfg.model_name
    if model is not None and model != served:
        raise APIError(404, f"the model '{model}' does not exist; this server serves '{served}'",
                       param="model", code="model_not_found")


async def _collect(sub, choices: list[Choice]) -> None:
    async for idx, it in sub.items():
        choices[idx].add(it)


async def run_request(request: Request, sub, choices: list[Choice], body_fn):
    """Non-streaming: wait for every choice (aborting all if the client leaves), then respond."""
    try:
        await unless_disconnected(request, _collect(sub, choices))
    except ClientGone:
        return gone_response()
    finally:
        sub.close()
    return JSONResponse(body_fn())


@router.post("/v1/completions", openapi_extra=body(CompletionRequest, streams=True))
async def create_completion(request: Request):
    req = await parse_json(request, CompletionRequest)
    state = request.app.state
    check_model(request, req.model)
    state.client.check_available()
    if req.suffix is not None:
        require_fim(request, "'suffix' (fill-in-the-middle)", "suffix")
    specs = req.prompt_specs()
    params = req.sampling_kwargs(req.max_tokens, req.logprobs)
    sub = await state.client.submit(specs, params, req.n, progress=req.return_progress)
    rid, created, model = f"cmpl-{sub.gid}", int(time.time()), state.cfg.model_name
    choices = [Choice(i, req.logprobs is not None) for i in range(len(sub.rids))]

    def obj(choice_list: list[dict], **extra) -> dict:
        return {"id": rid, "object": "text_completion", "created": created, "model": model,
                "choices": choice_list, "system_fingerprint": None, **extra}

    if not req.stream:
        return await run_request(request, sub, choices, lambda: obj(
            [{"index": c.index, "text": c.text, "finish_reason": c.finish_reason,
              "logprobs": completion_logprobs(c.lps) if c.want_logprobs else None} for c in choices],
            usage=usage(sub, choices, req.n)))

    extra = {"usage": None} if req.include_usage else {}

    async def events():
        offsets = [0] * len(choices)
        try:
            async for idx, it in sub.items():
                if "progress" in it:
                    yield sse(obj([], prompt_progress=progress_body(it, idx if len(choices) > 1 else None), **extra))
                    continue
                c = choices[idx]
                c.add(it)
                if not (it["text"] or it.get("lp") or it["done"]):
                    continue
                lp = None
                if c.want_logprobs:
                    lp = completion_logprobs(it.get("lp") or [], offsets[idx])
                    offsets[idx] += sum(len(x[0]) for x in it.get("lp") or [])
                yield sse(obj([{"index": idx, "text": it["text"], "logprobs": lp,
                                "finish_reason": c.finish_reason}], **extra))
            if req.include_usage:
                yield sse(obj([], usage=usage(sub, choices, req.n)))
        except APIError as e:
            yield sse(e.body())
        finally:
            sub.close()
        yield SSE_DONE

    return EngineStream(events(), on_close=sub.close)


@router.post("/v1/chat/completions", openapi_extra=body(ChatCompletionRequest, streams=True))
async def create_chat_completion(request: Request):
    req = await parse_json(request, ChatCompletionRequest)
    state = request.app.state
    check_model(request, req.model)
    state.client.check_available()
    top = (req.top_logprobs or 0) if req.logprobs else None
    params = req.sampling_kwargs(req.completion_max_tokens, top)
    mode = req.tool_mode  # None: no tools in play
    tools = ToolCalls(mode, [t.function.name for t in req.tools],
                      state.client.info.get("tool_call_format", "hermes")) if mode else None
    sub = await state.client.submit([req.prompt_spec()], params, req.n, progress=req.return_progress)
    rid, created, model = f"chatcmpl-{sub.gid}", int(time.time()), state.cfg.model_name
    choices = [Choice(i, req.logprobs) for i in range(len(sub.rids))]

    def obj(kind: str, choice_list: list[dict], **extra) -> dict:
        return {"id": rid, "object": kind, "created": created, "model": model, "choices": choice_list,
                "system_fingerprint": None, **extra}

    if not req.stream:
        return await run_request(request, sub, choices, lambda: obj(
            "chat.completion", [chat_choice(c, tools) for c in choices], usage=usage(sub, choices, req.n)))

    extra = {"usage": None} if req.include_usage else {}

    def chunk(idx: int, delta: dict, lp=None, finish=None) -> bytes:
        return sse(obj("chat.completion.chunk", [{"index": idx, "delta": delta, "logprobs": lp,
                                                  "finish_reason": finish}], **extra))

    streams = [tools.stream() for _ in choices] if tools else None

    async def events():
        try:
            for c in choices:
                yield chunk(c.index, {"role": "assistant", "content": ""})
            async for idx, it in sub.items():
                if "progress" in it:
                    yield sse(obj("chat.completion.chunk", [], **extra,
                                  prompt_progress=progress_body(it, idx if len(choices) > 1 else None)))
                    continue
                c = choices[idx]
                c.add(it)
                if streams is not None:  # tool calls: content and calls as the parser finds them
                    for delta in streams[idx].feed(it["text"]) + (streams[idx].finish() if it["done"] else []):
                        yield chunk(idx, delta)
                elif it["text"] or it.get("lp"):
                    lp = chat_logprobs(it.get("lp") or []) if c.want_logprobs else None
                    yield chunk(idx, {"content": it["text"]}, lp)
                if it["done"]:
                    finish = c.finish_reason if streams is None else tools.finish_reason(c.finish_reason,
                                                                                         streams[idx].num_calls)
                    yield chunk(idx, {}, finish=finish)
            if req.include_usage:
                yield sse(obj("chat.completion.chunk", [], usage=usage(sub, choices, req.n)))
        except APIError as e:
            yield sse(e.body())
        finally:
            sub.close()
        yield SSE_DONE

    return EngineStream(events(), on_close=sub.close)
