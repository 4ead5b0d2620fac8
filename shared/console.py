"""A console's bytes over NATS: one session, two subjects, sequence numbers, credit.

A web gateway asks the vm agent of a VM's host for a console (``vm.console``); the agent
connects to the VM's VNC socket or serial pty on its own host and answers a session id.
From then on bytes travel on ``phy.con.<host>.<session>.vm`` (towards the VM: the
gateway publishes, the agent reads) and ``phy.con.<host>.<session>.client`` (towards the
browser), so a console opens through any gateway of the cluster and no console port
leaves 127.0.0.1. Both ends run a ``ConsoleLink``:

- data: the body is raw bytes, with no headers; the reply subject numbers each message
  from 1 (``PUB <subject> <seq> <size>``: nobody replies to console bytes, and a message
  without headers saves each end parsing them, a round trip's largest share of nats-py's
  work); a gap (core NATS dropped one) closes the session rather than corrupt the stream.
  A ``Phy-Seq`` header in its place (the first version of this protocol) is read too;
- flow control: a sender keeps at most ``window`` bytes unacknowledged and waits for
  credit; the reader acknowledges what it has passed on (header ``Phy-Console: ack`` with
  ``Phy-Ack: <bytes>``) every quarter window. The opener's first ack (0 bytes) also says
  it listens: the agent sends nothing before, or the VNC server's greeting would be lost;
- liveness: ``Phy-Console: ping`` every ``PING_S``; a link that heard nothing from its
  peer for ``IDLE_S`` closes;
- the end: ``Phy-Console: close`` with ``Phy-Reason``; either side may send it.

    link = ConsoleLink(bus.nc, send=subjects.console(h, s, "vm"),
                       recv=subjects.console(h, s, "client"))
    await link.start(opener=True)
    await link.send(b"keys")
    data = await link.recv()        # None once the session closed; link.reason says why
    reason = await link.deliver(sink)  # or: every message to ``await sink(data)`` at once

A console's round trip (a key press, the screen update it causes) is made of turns of the
event loop, so a link takes as few as nats-py lets it:

- receiving: the subscription has no callback task; a queue of ours in its place
  (``natsfast.take_directly``) hands each message to the link in nats-py's reader task as
  it is parsed, and ``deliver`` runs the sink right there, up to its first wait (a WebSocket's or a
  socket's full buffer; such a sink is finished in a task, the messages after it queued
  behind it within the credit);
- sending: a message goes onto the NATS socket at once when nothing of the client's waits
  before it (``nc.publish`` would queue it for nats-py's flusher task); ``send_now`` sends
  without awaiting at all, for a relay that reads a socket in its callback.

Either falls back to nats-py's public way where its insides are not as expected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import types
from collections.abc import Callable, Coroutine, Generator
from typing import Any

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from shared import natsfast

log = logging.getLogger("phyllome.console")

WINDOW = 4 << 20  # bytes a sender may have unacknowledged
CHUNK = (1 << 20) - (4 << 10)  # largest data message (NATS's default max_payload is 1 MiB,
#                                headers included; a server that takes less gets less)
PING_S = 10.0
IDLE_S = 30.0
CONTROL, SEQ, ACK, REASON = "Phy-Console", "Phy-Seq", "Phy-Ack", "Phy-Reason"


class ConsoleLink:
    """One end of a console session."""

    def __init__(self, nc: Client, *, send: str, recv: str, window: int = WINDOW,
                 ping_s: float = PING_S, idle_s: float = IDLE_S) -> None:
        self.nc, self.send_subject, self.recv_subject = nc, send, recv
        self.window, self.ping_s, self.idle_s = window, ping_s, idle_s
        self.peer_listens = asyncio.Event()  # the peer sent something: it is subscribed
        self.closed = asyncio.Event()
        self.reason = ""
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._queued = 0
        self._sent = self._acked = 0  # bytes, this side's sending
        self._seq_out = self._seq_in = 0
        self._taken = self._ack_sent = 0  # bytes, this side's receiving
        self._credit = asyncio.Event()
        self._last_heard = time.monotonic()
        self._sub: Subscription | None = None
        self._pinger: asyncio.Task[None] | None = None
        self._sink: Callable[[bytes], Coroutine[Any, Any, None]] | None = None
        self._sink_failed: asyncio.Future[BaseException] | None = None
        self._behind = False  # a sink waits (a full socket): messages queue behind it
        self._sink_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._sending = False  # a send() is under way: send_now() leaves the bytes to it
        self.direct = False  # messages reach us in nats-py's reader task (take_directly)
        self.written_now = 0  # messages put on the NATS socket at once (see _write_now)

    @property
    def buffered(self) -> int:
        """Bytes received and not taken by ``recv`` yet."""
        return self._queued

    @property
    def unacked(self) -> int:
        """Bytes sent that the peer has not acknowledged yet (at most ``window``)."""
        return self._sent - self._acked

    async def start(self, *, opener: bool = False) -> None:
        """Listen; the opener then tells the peer so (the peer waits for it to send)."""
        sub = await self.nc.subscribe(self.recv_subject)
        self.direct = natsfast.take_directly(sub, self._take)
        if not self.direct:  # another nats-py inside: its subscription's own task calls us
            await sub.unsubscribe()
            sub = await self.nc.subscribe(self.recv_subject, cb=self._on_msg)
        self._sub = sub
        self._pinger = asyncio.create_task(self._ping(), name="console-ping")
        if opener:
            await self._control("ack", {ACK: "0"})

    def send_now(self, data: bytes) -> bool:
        """Send ``data`` here and now, without waiting: when the credit has room for it, it
        fits one message, and nothing of ours waits to go before it. False: nothing was
        sent, ``send`` it (a relay that reads a socket calls this as the bytes come, and
        saves its reading task a turn of the event loop)."""
        if (self._sending or self.closed.is_set() or not data or len(data) > self._chunk()
                or self.window - (self._sent - self._acked) < len(data)):
            return False
        if not self._write_now(data, None, str(self._seq_out + 1)):
            return False
        self._seq_out += 1
        self._sent += len(data)
        return True

    async def send(self, data: bytes) -> None:
        """Send ``data``, waiting for credit when the peer is ``window`` bytes behind."""
        self._sending = True
        try:
            await self._send(data)
        finally:
            self._sending = False

    async def _send(self, data: bytes) -> None:
        at = 0
        while at < len(data):
            # as much as the credit allows: a fixed-size chunk could wait forever for the
            # last bytes of the window, which the peer acknowledges only a quarter at a time
            room = self.window - (self._sent - self._acked)
            if room <= 0 and not self.closed.is_set():
                self._credit.clear()
                await self._wait(self._credit)
                continue
            if self.closed.is_set():
                return
            chunk = data[at:at + min(self._chunk(), room)]
            at += len(chunk)
            self._seq_out += 1
            self._sent += len(chunk)
            await self._publish(chunk, None, str(self._seq_out))

    async def recv(self) -> bytes | None:
        """The next bytes from the peer, or None once the session closed. Calling it again
        says the last bytes were passed on: that is when they are acknowledged."""
        if self._taken - self._ack_sent >= self.window // 4:
            self._ack_sent = self._taken
            await self._control("ack", {ACK: str(self._taken)})
        data = await self._queue.get()
        if data is not None:
            self._queued -= len(data)
            self._taken += len(data)
        return data

    async def deliver(self, sink: Callable[[bytes], Coroutine[Any, Any, None]]) -> str:
        """Pass the peer's bytes to ``sink`` as they come (what arrived before first), each
        acknowledged once ``sink`` returns, until the session closes: returns why it did.
        An exception of ``sink`` is raised here, the session still open (the caller closes
        it, telling the peer).

        ``sink`` runs as the message comes, in the task that read it off the NATS socket,
        up to its first wait (a WebSocket's or a socket's full buffer): a sink that does
        not wait costs no task switch at all. One that waits is finished in a task of its
        own, and the messages after it queue behind it, in order, within the credit."""
        while not self._queue.empty():  # meanwhile, what comes queues behind (no sink yet)
            data = self._queue.get_nowait()
            if data is None:
                return self.reason
            self._queued -= len(data)
            await sink(data)
            await self._taken_by_sink(len(data))
        # nothing awaited from the queue's last check to here: no message slips between
        failed: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()
        self._sink, self._sink_failed = sink, failed
        closed: asyncio.Future[Any] = asyncio.ensure_future(self.closed.wait())
        either: set[asyncio.Future[Any]] = {closed, failed}
        try:
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
        if failed.done():
            raise failed.result()
        failed.cancel()
        return self.reason

    async def _taken_by_sink(self, size: int) -> None:
        self._taken += size
        if self._taken - self._ack_sent >= self.window // 4:
            self._ack_sent = self._taken
            await self._control("ack", {ACK: str(self._taken)})

    async def close(self, reason: str, *, tell: bool = True) -> None:
        """End the session (once); ``tell`` the peer unless it is the one that ended it.
        Unsubscribes and stops the pinger however the session ended."""
        if not self.closed.is_set():
            self._end(reason)
            if tell:
                await self._control("close", {REASON: reason[:200]})
        pinger, self._pinger = self._pinger, None
        if pinger is not None and pinger is not asyncio.current_task():
            pinger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pinger
        sink_task, self._sink_task = self._sink_task, None
        if sink_task is not None and sink_task is not asyncio.current_task():
            sink_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sink_task
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()

    # -- inside ------------------------------------------------------------------------------

    def _end(self, reason: str) -> None:
        if not self.closed.is_set():
            self.reason = reason
            self.closed.set()
            self._credit.set()
            self._queue.put_nowait(None)

    async def _wait(self, event: asyncio.Event) -> None:
        closed = asyncio.ensure_future(self.closed.wait())
        got = asyncio.ensure_future(event.wait())
        try:
            await asyncio.wait({closed, got}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
            got.cancel()

    async def _publish(self, body: bytes, headers: dict[str, str] | None,
                       reply: str = "") -> None:
        if self._write_now(body, headers, reply):
            return
        try:
            await self.nc.publish(self.send_subject, body, reply=reply, headers=headers)
        except nats.errors.Error as e:
            self._end(f"the bus failed: {e!r}")

    def _chunk(self) -> int:
        """The largest data message: CHUNK, or less where the server takes less."""
        return min(CHUNK, self.nc.max_payload - (4 << 10))

    def _write_now(self, body: bytes, headers: dict[str, str] | None,
                   reply: str = "") -> bool:
        """Put the message on the connection's socket here and now, when nothing of the
        client's waits to go before it (``natsfast.write_now``): ``nc.publish`` queues it
        and wakes the client's flusher task, one more turn of the event loop per message.
        The socket's buffer holds at most the credit window of each session, and the
        flusher drains it with the rest."""
        if not natsfast.write_now(self.nc, self.send_subject, body, headers, reply):
            return False
        self.written_now += 1
        return True

    async def _control(self, what: str, headers: dict[str, str]) -> None:
        await self._publish(b"", {CONTROL: what, **headers})

    async def _on_msg(self, msg: Msg) -> None:
        self._take(msg)

    def _take(self, msg: Msg) -> None:
        """A message of the peer, as nats-py parsed it. Nothing here waits: what has to
        (telling the peer, a sink's full buffer) goes on in a task."""
        if self.closed.is_set():
            return
        self._last_heard = time.monotonic()
        self.peer_listens.set()
        headers = msg.headers
        if headers is None:  # data: its number is the reply subject
            self._data(msg.reply, msg.data)
            return
        control = headers.get(CONTROL)
        if control == "ack":
            self._acked = max(self._acked, int(headers.get(ACK, "0") or 0))
            self._credit.set()
        elif control == "close":
            self._end(headers.get(REASON, "closed by the other end"))
        elif control is None:
            self._data(headers.get(SEQ, ""), msg.data)

    def _data(self, number: str, data: bytes) -> None:
        seq = int(number) if number.isdigit() else 0
        if seq != self._seq_in + 1:
            self._close_soon(f"console data lost on the way (message {seq} after "
                             f"{self._seq_in}); open the console again")
            return
        self._seq_in = seq
        if self._sink is not None and not self._behind:
            self._sink_now(data)
            return
        self._queued += len(data)
        if self._queued > 2 * self.window:
            self._close_soon("the other end ignored flow control")
            return
        self._queue.put_nowait(data)

    def _sink_now(self, data: bytes) -> None:
        if self._sink is None or self._sink_failed is None or self._sink_failed.done():
            return  # the sink broke: its owner closes the session
        coro = self._sink(data)
        try:
            step = coro.send(None)
        except StopIteration:
            self._taken_now(len(data))
            return
        except Exception as e:  # handed to deliver()'s caller, who closes
            self._sink_failed.set_result(e)
            return
        self._behind = True
        self._sink_task = asyncio.create_task(self._sink_on(coro, step, len(data)),
                                              name="console-sink")

    async def _sink_on(self, coro: Coroutine[Any, Any, None], step: Any, size: int) -> None:
        """Finish a sink that waited, then pass on what queued behind it."""
        failed = self._sink_failed
        try:
            await _resume(coro, step)
            await self._taken_by_sink(size)
            while self._sink is not None and not self._queue.empty():
                data = self._queue.get_nowait()
                if data is None:
                    return
                self._queued -= len(data)
                await self._sink(data)
                await self._taken_by_sink(len(data))
            # nothing awaited from the queue's last check to here: no message slips between
            self._behind = False
        except Exception as e:  # handed to deliver()'s caller, who closes
            if failed is not None and not failed.done():
                failed.set_result(e)

    def _taken_now(self, size: int) -> None:
        self._taken += size
        if self._taken - self._ack_sent >= self.window // 4:
            self._ack_sent = self._taken
            headers = {CONTROL: "ack", ACK: str(self._taken)}
            if not self._write_now(b"", headers):
                self._spawn(self._publish(b"", headers))

    def _close_soon(self, reason: str) -> None:
        self._end(reason)
        self._spawn(self._tell_closed(reason))

    async def _tell_closed(self, reason: str) -> None:
        await self._control("close", {REASON: reason[:200]})
        await self.close(reason)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _ping(self) -> None:
        while not self.closed.is_set():
            await asyncio.sleep(self.ping_s)
            if time.monotonic() - self._last_heard > self.idle_s:
                await self.close(f"nothing heard from the other end for {self.idle_s:.0f} s")
                return
            await self._control("ping", {})


@types.coroutine
def _resume(coro: Coroutine[Any, Any, None], step: Any) -> Generator[Any, Any, None]:
    """Await the rest of ``coro``, which yielded ``step`` at its first ``send``: what the
    task gives back goes on to ``coro``, as ``await`` would have passed it."""
    while True:
        try:
            sent = yield step
        except BaseException as e:  # noqa: BLE001 - a cancel goes into coro as it came
            try:
                step = coro.throw(e)
            except StopIteration:
                return
        else:
            try:
                step = coro.send(sent)
            except StopIteration:
                return
