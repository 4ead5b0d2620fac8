"""Shortcuts through nats-py's insides for the two data paths that move many bytes (a
console's, a volume transfer's chunks), each falling back to nats-py's public way where
its insides are not as expected (another nats-py version).

- ``write_now``: put a message on the connection's socket at once when nothing of the
  client's waits before it. ``nc.publish`` builds one ``bytes`` of the command and the
  body (a copy of the body), queues it and wakes the client's flusher task (one more turn
  of the event loop), whose ``writelines`` joins the queue into one more copy.
- ``request_now``: ``nc.request`` through ``write_now``, the reply taken by nats-py's own
  request machinery (its response subscription and map of waiting futures).
- ``take_directly``: a subscription without a callback hands each message to a function of
  ours in nats-py's reader task as it is parsed, instead of queueing it for a task.
- ``receive_big``: a subscription's big messages are gathered straight into one buffer of
  their size as the socket's bytes come. nats-py's parser appends every read to one growing
  buffer (reallocated and copied as it grows past what it holds), then slices the payload
  out of it and copies the slice into ``bytes``: for a 4 MiB chunk that is three to ten
  copies of it, where this makes one. Such a message's ``data`` is a ``bytearray``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import sys
from collections.abc import Callable
from typing import Any

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.protocol import parser as nats_parser

log = logging.getLogger("phyllome.natsfast")

HDR_LINE = b"NATS/1.0\r\n"
_JOIN_BELOW = 64 << 10  # a smaller body is joined to its command: one write, not three
READER_LIMIT = 1 << 20  # see receive_big
POOL = 12  # payload buffers kept for reuse (a transfer's window of chunks, and some)


def write_now(nc: Client, subject: str, body: bytes | bytearray | memoryview,
              headers: dict[str, str] | None = None, reply: str = "") -> bool:
    """Put the message on ``nc``'s socket here and now, when nothing of the client's waits
    to go before it (so messages stay in order); False: nothing was written, publish it.
    The transport keeps what the socket does not take at once, and nats-py's flusher
    drains it with the rest. Subject, reply and headers must be valid (ours are)."""
    writer = getattr(getattr(nc, "_transport", None), "_io_writer", None)
    if (writer is None or getattr(nc, "_pending", True) or not nc.is_connected
            or len(body) > nc.max_payload):
        return False
    target = f"{subject} {reply}" if reply else subject
    if headers:
        hdr = "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode()
        size = len(HDR_LINE) + len(hdr) + 2
        head = (f"HPUB {target} {size} {size + len(body)}\r\n".encode()
                + HDR_LINE + hdr + b"\r\n")
    else:
        head = f"PUB {target} {len(body)}\r\n".encode()
    if len(body) < _JOIN_BELOW:
        writer.write(head + body + b"\r\n")
    else:  # a big body goes as it is: no copy into one buffer first
        writer.write(head)
        writer.write(body)
        writer.write(b"\r\n")
    return True


async def request_now(nc: Client, subject: str, body: bytes | bytearray | memoryview,
                      headers: dict[str, str] | None = None, *, timeout: float) -> Msg:
    """``nc.request(subject, body, headers=headers, timeout=timeout)``, the request put on
    the socket at once where ``write_now`` can (see there). Raises what ``nc.request``
    raises on a timeout (``nats.errors.TimeoutError``) and when nobody listens
    (``nats.errors.NoRespondersError``)."""
    resp_map = getattr(nc, "_resp_map", None)
    nuid = getattr(nc, "_nuid", None)
    if not isinstance(resp_map, dict) or nuid is None or not nc.is_connected:
        return await nc.request(subject, bytes(body), timeout=timeout, headers=headers)
    if not getattr(nc, "_resp_sub_prefix", None):
        await nc._init_request_sub()
        resp_map = nc._resp_map
    token = nuid.next()
    token.extend(secrets.token_hex(2).encode())
    key = token.decode()
    inbox = (nc._resp_sub_prefix + token).decode()
    future: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()
    future.add_done_callback(lambda _f: resp_map.pop(key, None))
    resp_map[key] = future
    try:
        if not write_now(nc, subject, body, headers, reply=inbox):
            await nc.publish(subject, bytes(body), reply=inbox, headers=headers)
        msg = await asyncio.wait_for(future, timeout)
    except TimeoutError:
        raise nats.errors.TimeoutError from None
    finally:
        if not future.done():
            future.cancel()
    if msg.headers and msg.headers.get("Status") == "503":
        raise nats.errors.NoRespondersError
    return msg


class _Direct(asyncio.Queue[Msg]):
    """In place of a subscription's queue of messages: hands each to ``take`` as nats-py's
    reader task parses it. nats-py puts a message in its subscription's queue, and the
    subscription's task takes it out, one more switch of the event loop per message; a
    subscription without a callback has no task, and this queue none either."""

    def __init__(self, sub: Subscription, take: Callable[[Msg], None]) -> None:
        super().__init__()
        self._direct_sub, self._direct_take = sub, take

    def put_nowait(self, item: Msg) -> None:
        self._direct_sub._pending_size -= len(item.data)
        try:
            self._direct_take(item)
        except Exception:  # never into nats-py's reader: it would stop reading the socket
            log.exception("a message of %s failed", self._direct_sub.subject)


def take_directly(sub: Subscription, take: Callable[[Msg], None]) -> bool:
    """Have the callback-less ``sub`` hand each message to ``take`` in nats-py's reader
    task (``take`` must not wait; what has to goes on in a task). False where this nats-py
    has no such queue: unsubscribe and subscribe with a callback instead."""
    queue = getattr(sub, "_pending_queue", None)
    if not isinstance(queue, asyncio.Queue) or not isinstance(
            getattr(sub, "_pending_size", None), int):
        return False
    direct = sub._pending_queue = _Direct(sub, take)
    while not queue.empty():
        direct.put_nowait(queue.get_nowait())
    return True


def receive_big(nc: Client, sub: Subscription, min_bytes: int = 256 << 10) -> bool:
    """Gather ``sub``'s messages of ``min_bytes`` or more straight into a buffer of their
    size (their ``data`` is then a ``bytearray``); see the module's text. False where this
    nats-py's parser is not the one this was written against (nothing changed)."""
    ps = getattr(nc, "_ps", None)
    if isinstance(ps, _BigParser):
        ps.big_sids[sub._id] = min_bytes
        return True
    if type(ps) is not nats_parser.Parser or not hasattr(ps, "header_needed"):
        return False
    big = _BigParser(nc)
    big.big_sids[sub._id] = min_bytes
    nc._ps = big  # between two reads: nothing half parsed lost
    big.buf, big.state, big.needed = ps.buf, ps.state, ps.needed
    big.header_needed, big.msg_arg = ps.header_needed, ps.msg_arg
    reader = getattr(getattr(nc, "_transport", None), "_io_reader", None)
    limit = getattr(reader, "_limit", None)
    if isinstance(reader, asyncio.StreamReader) and isinstance(limit, int):
        # it stops reading the socket past twice this (nats-py's: 32 KiB), a pause and a
        # resume for about every read of a big message
        reader._limit = max(limit, READER_LIMIT)  # type: ignore[attr-defined]
    writer = getattr(getattr(nc, "_transport", None), "_io_writer", None)
    transport = getattr(writer, "transport", None)
    if isinstance(reader, asyncio.StreamReader) and transport is not None and \
            hasattr(transport, "set_protocol") and \
            transport.get_extra_info("sslcontext") is None:  # a plain socket's (not TLS)
        inner = transport.get_protocol()
        if isinstance(inner, asyncio.StreamReaderProtocol):
            transport.set_protocol(_Into(inner, big, reader))
    return True


def drop_buffers(nc: Client) -> None:
    """Let go of the buffers ``receive_big`` keeps for reuse (when no big messages are
    expected for a while: the end of a transfer); new ones are made as needed."""
    ps = getattr(nc, "_ps", None)
    if isinstance(ps, _BigParser):
        ps.pool.clear()


class _Into(asyncio.BufferedProtocol):
    """In place of the connection's stream reader protocol: while the parser gathers a big
    payload and nothing read waits before it, the socket is read straight into the
    payload's buffer (no ``bytes`` of each read, no copy into the stream reader and out).
    Everything else goes to the stream reader as before."""

    def __init__(self, inner: asyncio.StreamReaderProtocol, ps: _BigParser,
                 reader: asyncio.StreamReader) -> None:
        self.inner, self.ps, self.reader = inner, ps, reader
        self.scratch = bytearray(256 << 10)
        self.into = False

    def get_buffer(self, sizehint: int) -> memoryview:
        ps, target = self.ps, self.ps._target
        self.into = (target is not None and ps._filled < len(target)
                     and not self.reader._buffer)  # type: ignore[attr-defined]
        if self.into:
            assert target is not None
            return memoryview(target)[ps._filled:]
        return memoryview(self.scratch)

    def buffer_updated(self, nbytes: int) -> None:
        if self.into:
            self.ps._filled += nbytes  # the CRLF after it comes the usual way: then it is
            return  # handed on
        self.inner.data_received(bytes(self.scratch[:nbytes]))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.inner.connection_lost(exc)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class _BigParser(nats_parser.Parser):
    """nats-py's parser, but a big message of the subscriptions in ``big_sids`` is copied
    once, from each read into a buffer of its size, and never through the growing buffer."""

    def __init__(self, nc: Any) -> None:
        self.big_sids: dict[int, int] = {}  # sid -> smallest payload gathered this way
        self.pool: list[bytearray] = []  # payload buffers handed out, reused once free
        super().__init__(nc)

    def reset(self) -> None:
        super().reset()
        self._target: bytearray | None = None  # the payload being gathered
        self._filled = 0
        self._crlf = 0  # bytes of the CRLF after it still to skip
        self._hdr = b""

    async def parse(self, data: bytes | memoryview = b"") -> None:
        self._maybe_start(len(data))
        if self._target is not None:
            view = memoryview(data)
            used = self._fill(view)
            if not self._complete():
                self._drain()
                if not self._complete():
                    return  # all of data taken
            await self._deliver()
            data = view[used:]
            if not data:
                return
        await super().parse(data)  # type: ignore[arg-type]  # it takes any bytes-like
        self._maybe_start(0)  # before the next read: that can go straight into it (_Into)

    def _maybe_start(self, coming: int) -> None:
        """Gather the payload the parser waits for in a buffer of its own, if it is big, of
        one of ours, and ``coming`` more bytes do not complete it anyway."""
        if (self._target is None and self.state == nats_parser.AWAITING_MSG_PAYLOAD
                and len(self.buf) >= self.header_needed):
            least = self.big_sids.get(self.msg_arg.get("sid", -1))
            size = self.needed - self.header_needed
            if least is not None and size >= least and len(self.buf) < self.needed and \
                    len(self.buf) + coming < self.needed + 2:
                self._start(size)

    def _complete(self) -> bool:
        return self._target is not None and self._filled == len(self._target) and \
            not self._crlf

    def _drain(self) -> None:
        """Take the rest of the payload from what the connection's stream reader holds
        already, rather than 32 KiB a turn of nats-py's reading task, each copied once
        more into ``bytes`` first."""
        reader = getattr(getattr(self.nc, "_transport", None), "_io_reader", None)
        buf = getattr(reader, "_buffer", None)
        if not isinstance(buf, bytearray) or not buf:
            return
        with memoryview(buf) as view:
            used = self._fill(view)
        del buf[:used]
        resume = getattr(reader, "_maybe_resume_transport", None)
        if resume is not None:
            resume()

    def _buffer(self, size: int) -> bytearray:
        """A buffer of ``size`` bytes: one handed out before that nobody holds any more
        (counted by reference: the pool's, the loop's, getrefcount's argument), else a new
        one (a new one costs zeroing or faulting in each of its pages: 2 ms for 4 MiB)."""
        for buf in self.pool:
            if len(buf) == size and sys.getrefcount(buf) == 3:
                return buf
        buf = bytearray(size)
        self.pool.append(buf)
        if len(self.pool) > POOL:
            del self.pool[0]
        return buf

    def _start(self, size: int) -> None:
        hn = self.header_needed
        self._hdr = bytes(self.buf[:hn]) if hn else b""
        target = self._target = self._buffer(size)
        have = len(self.buf) - hn
        target[:have] = memoryview(self.buf)[hn:]
        self._filled, self._crlf = have, 2
        self.buf = bytearray()

    def _fill(self, view: memoryview) -> int:
        """Take what of ``view`` belongs to the payload (and its CRLF); how much it took."""
        target = self._target
        assert target is not None
        n = min(len(view), len(target) - self._filled)
        if n:
            target[self._filled:self._filled + n] = view[:n]
            self._filled += n
        skip = min(len(view) - n, self._crlf) if self._filled == len(target) else 0
        self._crlf -= skip
        return n + skip

    async def _deliver(self) -> None:
        payload, hdr = self._target, self._hdr or None
        arg = self.msg_arg
        self._target, self._hdr, self._filled = None, b"", 0
        self.state, self.header_needed = nats_parser.AWAITING_CONTROL_LINE, 0
        await self.nc._process_msg(arg["sid"], arg["subject"], arg["reply"], payload, hdr)
