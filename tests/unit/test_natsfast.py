"""shared/natsfast.py's parser for big messages: the same messages as nats-py's own parser,
however the socket's bytes are cut, with or without a stream reader to drain."""

from __future__ import annotations

import asyncio
import os
from types import SimpleNamespace
from typing import Any

import pytest
from nats.protocol.parser import Parser

from shared import natsfast

BIG = 40 << 10


class FakeClient:
    def __init__(self, reader: asyncio.StreamReader | None = None) -> None:
        self._ps = Parser(self)
        self._transport = SimpleNamespace(_io_reader=reader) if reader is not None else None
        self.got: list[tuple[int, bytes, bytes, bytes, bytes | None]] = []
        self.pings = 0

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: Any,
                           headers: Any) -> None:
        self.got.append((sid, bytes(subject), bytes(reply), bytes(data),
                         None if headers is None else bytes(headers)))

    async def _process_ping(self) -> None:
        self.pings += 1


def hmsg(subject: str, sid: int, reply: str, headers: bytes, body: bytes) -> bytes:
    hdr = b"NATS/1.0\r\n" + headers + b"\r\n"
    r = f" {reply}" if reply else ""
    return (f"HMSG {subject} {sid}{r} {len(hdr)} {len(hdr) + len(body)}\r\n".encode() + hdr
            + body + b"\r\n")


def stream() -> bytes:
    big1, big2, big3 = os.urandom(BIG), os.urandom(BIG + 5), os.urandom(BIG)
    return b"".join([
        b"MSG a 1 5\r\nhello\r\n",
        hmsg("phy.h.storage.chunk", 2, "_INBOX.x.y", b"Phy-Offset: 0\r\n", big1),
        b"PING\r\n",
        f"MSG phy.h.storage.chunk 2 {len(big2)}\r\n".encode() + big2 + b"\r\n",
        hmsg("other", 3, "", b"K: v\r\n", big3),  # big, but not a subscription of ours
        hmsg("phy.h.storage.chunk", 2, "", b"Phy-Offset: 1\r\n", b"small"),
        b"MSG a 1 0\r\n\r\n",
    ])


async def reference(data: bytes) -> FakeClient:
    nc = FakeClient()
    await nc._ps.parse(data)
    return nc


@pytest.mark.parametrize("piece", [1, 7, 4096, 32768, 50_000, 1 << 30])
@pytest.mark.parametrize("with_reader", [False, True])
async def test_big_messages_parse_as_nats_py_parses_them(piece: int, with_reader: bool) -> None:
    data = stream()
    want = await reference(data)
    reader = asyncio.StreamReader(limit=32768) if with_reader else None
    nc = FakeClient(reader)
    sub = SimpleNamespace(_id=2)
    assert natsfast.receive_big(nc, sub, 16 << 10)  # type: ignore[arg-type]
    assert isinstance(nc._ps, natsfast._BigParser)
    if reader is None:
        for at in range(0, len(data), piece):
            await nc._ps.parse(data[at:at + piece])
    else:  # as nats-py reads: what arrived waits in the reader, taken 32 KiB at a time
        for at in range(0, len(data), piece):
            reader.feed_data(data[at:at + piece])
            while reader._buffer:  # type: ignore[attr-defined]
                await nc._ps.parse(await reader.read(32768))
    assert nc.got == want.got
    assert nc.pings == want.pings == 1
    assert len(want.got) == 6
    assert nc._ps._target is None and not nc._ps.buf


async def test_another_parser_is_left_alone() -> None:
    nc = FakeClient()
    nc._ps = object()  # type: ignore[assignment]
    assert not natsfast.receive_big(nc, SimpleNamespace(_id=2))  # type: ignore[arg-type]
