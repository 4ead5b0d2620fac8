"""``GET /api/v1/events``: PHY_EVENTS as Server-Sent Events, resumable by ``Last-Event-ID``.

Each event goes out with its stream sequence as the SSE ``id``, so a browser's
``EventSource`` that reconnects sends ``Last-Event-ID`` and gets what it missed, from the
stream, before the new events::

    id: 1234
    data: {"subject":"phy.evt.h1.vm.state.4f0c","time":1.7e9,"seq":1234,"event":{"type":...}}

A comment line every ``KEEPALIVE_S`` keeps proxies from closing a quiet stream and lets the
server notice a client that left.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator

import msgspec
from prometheus_client import Gauge

from shared.bus import Bus, StreamEvent
from shared.errors import InvalidName

KEEPALIVE_S = 15.0
_TOKEN = re.compile(r"^[A-Za-z0-9_\-:]{1,128}$|^\*$")


def check_filter(subject: str) -> str:
    """``subject`` if it is a filter over ``phy.evt.>``: tokens, ``*``, and ``>`` last."""
    parts = subject.split(".")
    ok = (len(parts) >= 3 and parts[:2] == ["phy", "evt"]
          and all(_TOKEN.match(p) for p in parts[2:-1])
          and (_TOKEN.match(parts[-1]) is not None or parts[-1] == ">"))
    if not ok:
        raise InvalidName(f"event subject filter {subject!r}: use phy.evt.> or a narrower "
                          "filter such as phy.evt.h1.vm.> or phy.evt.*.vm.state.*")
    return subject


def frame(event: StreamEvent) -> bytes:
    """One SSE message; an event body that is not JSON goes out as text."""
    try:
        body = msgspec.json.decode(event.data)
    except msgspec.DecodeError:
        body = {"raw": event.data.decode(errors="replace")}
    data = msgspec.json.encode({"subject": event.subject, "time": event.time, "seq": event.seq,
                                "event": body})
    return b"id: %d\ndata: %s\n\n" % (event.seq, data)


async def sse(bus: Bus, subject: str, *, since: float | None, after: int | None,
              stopping: asyncio.Event, open_streams: Gauge) -> AsyncIterator[bytes]:
    """The stream's bytes until the client leaves or the gateway stops."""
    queue: asyncio.Queue[StreamEvent] = asyncio.Queue(maxsize=1000)
    # Read before the response starts, so a bad start (no stream yet) is answered as an error.
    await bus.ensure_stream()
    source = bus.stream(subject, since=since, after=after, follow=True)

    async def pump() -> None:
        async with contextlib.aclosing(source):
            async for event in source:
                await queue.put(event)

    async def frames() -> AsyncIterator[bytes]:
        reader = asyncio.create_task(pump(), name="web-sse-pump")
        stop = asyncio.create_task(stopping.wait())
        open_streams.inc()
        try:
            yield b"retry: 2000\n\n"
            while True:
                got = asyncio.create_task(queue.get())
                done, _ = await asyncio.wait({got, stop, reader}, timeout=KEEPALIVE_S,
                                             return_when=asyncio.FIRST_COMPLETED)
                if got in done:
                    yield frame(got.result())
                    continue
                got.cancel()
                if stop in done or reader in done:
                    return  # the gateway stops, or the bus lost the stream: the client retries
                yield b": keepalive\n\n"
        finally:
            open_streams.dec()
            for task in (reader, stop):
                task.cancel()
            await asyncio.gather(reader, stop, return_exceptions=True)

    return frames()

