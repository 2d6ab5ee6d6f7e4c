"""SSE keepalive comments on a silent stream, and closing it (client gone) runs the stream's cleanup."""

import asyncio

from csps.server.sse_keepalive import KEEPALIVE, with_keepalive


async def slow_events(log: list, delays: list[float]):
    try:
        for i, d in enumerate(delays):
            await asyncio.sleep(d)
            yield f"data: {i}\n\n".encode()
    finally:
        log.append("closed")


def test_keepalives_fill_the_silences_and_nothing_is_lost():
    async def main():
        log = []
        return [c async for c in with_keepalive(slow_events(log, [0.35, 0.0, 0.0, 0.25]), 0.1)], log

    chunks, log = asyncio.run(main())
    data = [c for c in chunks if c != KEEPALIVE]
    assert data == [b"data: 0\n\n", b"data: 1\n\n", b"data: 2\n\n", b"data: 3\n\n"] and log == ["closed"]
    first = chunks.index(b"data: 0\n\n")
    assert first >= 1 and set(chunks[:first]) == {KEEPALIVE}  # (~3 in the 0.35 s before the first event)
    assert KEEPALIVE in chunks[chunks.index(b"data: 2\n\n"):]  # and again in the silence before the last
    assert KEEPALIVE == b": keepalive\n\n"  # an SSE comment line


def test_a_busy_stream_gets_no_keepalive():
    async def main():
        return [c async for c in with_keepalive(slow_events([], [0.01] * 5), 1.0)]

    assert KEEPALIVE not in asyncio.run(main())


def test_closing_while_waiting_cancels_the_pending_event_and_runs_its_cleanup():
    async def main():
        log = []
        stream = with_keepalive(slow_events(log, [10.0]), 0.05)
        assert await stream.__anext__() == KEEPALIVE
        await stream.aclose()  # what the server does when the client disconnects
        return log

    assert asyncio.run(asyncio.wait_for(main(), 5)) == ["closed"]


def test_keepalive_interval_0_or_off_turns_them_off():
    import argparse

    import pytest
    from csps.server.cli import seconds_or_off
    from csps.server.config import ServerConfig

    assert seconds_or_off("off") == seconds_or_off("0") == 0.0 and seconds_or_off("2.5") == 2.5
    with pytest.raises(argparse.ArgumentTypeError):
        seconds_or_off("-1")
    assert ServerConfig(engine_kwargs={"model": "dummy:tiny"}, sse_keepalive_interval_s=0).sse_keepalive_interval_s == 0
