"""POST /v1/summarize: a document as JSON ``{"text": ...}`` or a multipart file upload, summary out.

Streaming sends server-sent events: ``summary.plan`` (strategy, document tokens), then
``summary.progress`` per finished chunk (map-reduce), with ``return_progress`` the final pass's
``summary.prompt_progress`` (its prefill), ``summary.delta`` pieces of the final summary, and the
complete ``summary`` object last, followed by ``data: [DONE]``; ``: keepalive`` comments fill silences.
"""

from __future__ import annotations

import asyncio
import uuid

from csps.server.errors import APIError, bad_request
from csps.server.http_io import (
    SSE_DONE,
    ClientGone,
    EngineStream,
    decode_utf8,
    gone_response,
    parse_json,
    sse,
    unless_disconnected,
    validate,
)
from csps.server.openai_api import check_model
from csps.server.openapi import body
from csps.server.protocol import SummarizeRequest
from csps.server.schema_rules import NOT_BLANK, is_blank
from csps.server.summarize import Summarizer
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile

router = APIRouter()

# the multipart form: the document as 'file' (an uploaded file or a text field: `curl -F file=@doc.txt` or
# `-F "file=<doc.txt"`); the other fields of SummarizeRequest may follow as form fields
UPLOAD_SCHEMA = {"type": "object", "required": ["file"], "additionalProperties": False, "properties": {
    "file": {"type": "string", "contentMediaType": "text/plain", "pattern": NOT_BLANK,
             "description": "the document (UTF-8 text)"}}}


async def read_summarize_request(request: Request) -> SummarizeRequest:
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith("multipart/form-data"):
        return await parse_json(request, SummarizeRequest)
    try:
        form = await request.form()
    except APIError:
        raise
    except Exception as e:  # noqa: BLE001 - python-multipart's parse errors
        raise bad_request(f"malformed multipart body: {e}", code="invalid_multipart") from None
    fields: dict = {}
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            if key != "file":
                raise bad_request(f"unexpected file field '{key}' (send the document as 'file')", param=key)
            fields["text"] = decode_utf8(await value.read(), what="uploaded file")
        elif key == "file":
            fields["text"] = value
        else:
            fields[key] = value
    if "file" not in form and "text" not in fields:
        raise bad_request("no document: upload it as the 'file' field", param="file", code="missing_required_parameter")
    return validate(SummarizeRequest, fields, strict=False)


@router.post("/v1/summarize", openapi_extra=body(SummarizeRequest, multipart=UPLOAD_SCHEMA, streams=True))
async def summarize(request: Request):
    req = await read_summarize_request(request)
    state = request.app.state
    check_model(request, req.model)
    state.client.check_available()
    if is_blank(req.text):
        raise bad_request("the document is empty", param="text", code="empty_prompt")
    sid = f"sum-{uuid.uuid4().hex[:16]}"
    events: asyncio.Queue = asyncio.Queue()
    summarizer = Summarizer(state.client, req, state.cfg.summarize_concurrency, on_event=events.put_nowait)

    def finish(result: dict) -> dict:
        return {"id": sid, **result, "model": state.cfg.model_name}

    if not req.stream:
        try:
            result = await unless_disconnected(request, summarizer.run(req.text))
        except ClientGone:
            return gone_response()
        return JSONResponse(finish(result))

    task = asyncio.ensure_future(summarizer.run(req.text))
    # wait for the plan (or an early error, which still gets its own status code)
    first = asyncio.ensure_future(events.get())
    await asyncio.wait({task, first}, return_when=asyncio.FIRST_COMPLETED)
    if not first.done():
        first.cancel()
        task.result()  # raises the error
    plan = first.result()

    async def stream():
        yield sse({"id": sid, **plan})
        getter = None
        try:
            while True:
                getter = asyncio.ensure_future(events.get())
                await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield sse({"id": sid, **getter.result()})
                    continue
                getter.cancel()
                while not events.empty():
                    yield sse({"id": sid, **events.get_nowait()})
                yield sse(finish(task.result()))
                break
        except APIError as e:
            yield sse(e.body())
        finally:
            if getter is not None:
                getter.cancel()
        yield SSE_DONE

    return EngineStream(stream(), on_close=task.cancel)
