"""llama.cpp server's native endpoints: ``POST /completion`` and ``POST /infill`` (fill-in-the-middle with
repository context), for coding assistants written against llama.cpp (llama.vscode, Continue).

The response is llama.cpp's: ``content``, ``stop``, ``stop_type`` (eos | word | limit), ``stopping_word``,
``tokens_predicted``, ``tokens_evaluated`` (prompt tokens), ``tokens_cached`` (of them, served from the
prefix cache), ``timings {prompt_n, prompt_ms, ..., predicted_n, predicted_ms, ...}`` (prompt_n: tokens
computed, the cached ones excluded), ``generation_settings``. Streamed, each ``data:`` chunk holds
``content``, ``tokens`` and ``stop``; the last one (``stop: true``) the whole result, and, as llama.cpp's
native endpoints do, no ``[DONE]`` follows.
"""

from __future__ import annotations

import time

from csps.server.errors import APIError
from csps.server.http_io import ClientGone, EngineStream, gone_response, parse_json, sse, unless_disconnected
from csps.server.llama_protocol import InfillRequest, LlamaCompletionRequest, LlamaSampling
from csps.server.llama_stops import LocalStops
from csps.server.openai_api import check_model, require_fim
from csps.server.openapi import body
from csps.server.prompt_progress import progress_body
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter()

# the engine's names for what these endpoints call otherwise (its errors name the field at fault)
PARAM_NAMES = {"max_tokens": "n_predict", "messages": "prompt"}


class LlamaResult:
    """One request's text, counts and timings as llama.cpp reports them. Timings come from the engine's
    timestamps; for a completion stopped here (n_indent, t_max_predict_ms: the engine request is aborted
    and sends no final record) from its prefill progress and this process's clock."""

    def __init__(self, req: LlamaSampling, prompt_tokens: int) -> None:
        self.req = req
        self.prompt_tokens = prompt_tokens
        self.stops = LocalStops(req.n_indent, req.t_max_predict_ms)
        self.parts: list[str] = []
        self.ids: list[int] = []
        self.final: dict | None = None  # the engine's last item (done)
        self.progress: dict | None = None
        self.first_s: float | None = None
        self.last_s: float | None = None

    @property
    def done(self) -> bool:
        return self.final is not None or self.stops.stopped

    def add(self, it: dict) -> str:
        """An item of the submission; the text it releases."""
        if "progress" in it:
            self.progress = it["progress"]
            return ""
        now = time.perf_counter()
        if it["ids"]:
            self.first_s = self.first_s or now
            self.last_s = now
            self.ids += it["ids"]
        text = self.stops.feed(it["text"], now)
        if it["done"]:
            self.final = it
            text += self.stops.flush()
        self.parts.append(text)
        return text

    @property
    def content(self) -> str:
        return "".join(self.parts)

    def stop_type(self) -> tuple[str, str]:
        if self.final is None or self.final["reason"] == "length":
            return "limit", ""
        stop = self.final.get("stop")
        return ("word", stop) if isinstance(stop, str) else ("eos", "")

    def timings(self) -> dict:
        f = self.final
        if f is not None:
            m = f["m"]
            end = m["first_token_s"] if m["first_token_s"] is not None else m["finished_s"]
            prompt_ms = (end - m["first_scheduled_s"]) * 1e3 if m["first_scheduled_s"] is not None else 0.0
            predicted_ms = (m["finished_s"] - m["first_token_s"]) * 1e3 if m["first_token_s"] is not None else 0.0
            cached, predicted = f["nc"], f["ng"]
        else:
            cached = self.progress["cached"] if self.progress else 0
            prompt_ms = self.progress["time_ms"] if self.progress else 0.0
            predicted_ms = (self.last_s - self.first_s) * 1e3 if self.first_s is not None else 0.0
            predicted = len(self.ids)
        computed = self.prompt_tokens - cached
        return {"cache_n": cached, "prompt_n": computed, "prompt_ms": prompt_ms,
                "prompt_per_token_ms": prompt_ms / computed if computed else 0.0,
                "prompt_per_second": computed * 1e3 / prompt_ms if prompt_ms > 0 else 0.0,
                "predicted_n": predicted, "predicted_ms": predicted_ms,
                "predicted_per_token_ms": predicted_ms / predicted if predicted else 0.0,
                "predicted_per_second": predicted * 1e3 / predicted_ms if predicted_ms > 0 else 0.0}

    def body(self, model: str, settings: dict, content: str, tokens: list[int]) -> dict:
        """The final result; ``content`` and ``tokens``: all of them, or a stream's last piece."""
        stop_type, word = self.stop_type()
        t = self.timings()
        full = self.content
        return {"index": 0, "content": content, "tokens": tokens, "stop": True,
                "model": model, "tokens_predicted": t["predicted_n"], "tokens_evaluated": self.prompt_tokens,
                "tokens_cached": t["cache_n"], "generation_settings": settings, "has_new_line": "\n" in full,
                "truncated": False, "stop_type": stop_type, "stopping_word": word, "timings": t}


def select_fields(obj: dict, fields: list[str] | None) -> dict:
    """llama.cpp's ``response_fields``: only the named fields; 'a/b' takes b out of a, named 'a/b'."""
    if fields is None:
        return obj
    out = {}
    for path in fields:
        value, ok = obj, True
        for key in path.split("/"):
            if isinstance(value, dict) and key in value:
                value = value[key]
            else:
                ok = False
                break
        if ok:
            out[path] = value
    return out


def renamed(e: APIError) -> APIError:
    """An engine error in this API's field names (n_predict, not max_tokens)."""
    if e.param not in PARAM_NAMES:
        return e
    return APIError(e.status, e.message.replace("max_tokens", "n_predict"), param=PARAM_NAMES[e.param],
                    code=e.code, headers=e.headers)


async def run(request: Request, req: LlamaSampling, spec: dict, fim: bool):
    state = request.app.state
    check_model(request, req.model)
    state.client.check_available()
    if fim:
        require_fim(request, "/infill", None)
    try:
        # progress always: it carries the cached and prefill time of a completion stopped here
        sub = await state.client.submit([spec], req.sampling_fields(), 1, progress=True)
    except APIError as e:
        raise renamed(e) from None
    model = state.cfg.model_name
    settings = {**req.settings(), "n_ctx": state.client.info.get("max_model_len"), "model": model}
    if fim:
        settings["fim_template"] = state.client.info.get("fim")
    res = LlamaResult(req, sub.prompt_tokens[0])

    if not req.stream:
        async def collect() -> None:
            async for _, it in sub.items():
                res.add(it)
                if res.done:
                    return

        try:
            await unless_disconnected(request, collect())
        except ClientGone:
            return gone_response()
        finally:
            sub.close()  # aborts a completion stopped here
        body = res.body(model, settings, res.content, res.ids if req.return_tokens else [])
        return JSONResponse(select_fields(body, req.response_fields))

    async def events():
        try:
            async for _, it in sub.items():
                text = res.add(it)
                if "progress" in it:
                    if req.return_progress:
                        yield sse({"index": 0, "content": "", "tokens": [], "stop": False,
                                   "prompt_progress": progress_body(it)})
                    continue
                if res.done:
                    yield sse(res.body(model, settings, text, it["ids"]))
                    break
                if text or it["ids"]:
                    yield sse({"index": 0, "content": text, "tokens": it["ids"], "stop": False})
        except APIError as e:
            yield sse(e.body())
        finally:
            sub.close()

    return EngineStream(events(), on_close=sub.close)


@router.post("/completion", openapi_extra=body(LlamaCompletionRequest, streams=True))
async def completion(request: Request):
    req = await parse_json(request, LlamaCompletionRequest)
    return await run(request, req, req.prompt_spec(), fim=False)


@router.post("/infill", openapi_extra=body(InfillRequest, streams=True))
async def infill(request: Request):
    req = await parse_json(request, InfillRequest)
    return await run(request, req, req.prompt_spec(), fim=True)
