"""SSE keepalive: a comment line on a stream that has sent nothing for a while.

Proxies and load balancers cut connections that stay idle for ~60 s, and a streamed request sends
nothing between its acceptance and its first token, which a long prefill makes minutes. Comment lines
(``: keepalive``) are part of the SSE format and every client skips them (the OpenAI SDKs, browsers'
EventSource, Continue, llama.cpp's web UI).
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

KEEPALIVE = b": keepalive\n\n"


async def with_keepalive(events: AsyncIterator[bytes], interval_s: float) -> AsyncIterator[bytes]:
    """``events`` unchanged, plus ``KEEPALIVE`` whenever ``interval_s`` seconds passed since the last thing
    sent. The next event is awaited in a task that a keepalive does not interrupt; closing this iterator
    (the client left) cancels that task, so ``events``' own ``finally`` blocks run."""
    it = events.__aiter__()
    pending: asyncio.Future | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(it.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=interval_s)
            if not done:
                yield KEEPALIVE
                continue
            task, pending = pending, None
            try:
                chunk = task.result()
            except StopAsyncIteration:
                return
            yield chunk
    finally:
        if pending is not None:
            pending.cancel()
            await asyncio.wait({pending})  # (raises only if this task itself is cancelled again)
            if not pending.cancelled():
                pending.exception()  # retrieved: the client is gone, nobody reads it
        aclose = getattr(it, "aclose", None)
        if aclose is not None:
            await aclose()
