"""Consoles of this host's VMs, bridged to NATS sessions (the protocol: ``shared/console.py``).

``vm.console`` connects to the running VM's VNC socket (on this host's loopback, where
libvirt listens) or opens its serial pty, then answers a session; the bridge pumps bytes
between that and the session's subjects until either side ends: the client closes, the VM
stops (its socket or pty closes), the client goes quiet, or the agent drains. The console
password stays in libvirt's XML: the VNC client (noVNC) asks for it as it would over TCP::

    bridge = ConsoleBridge(agent.bus.nc, agent.host)
    session = await bridge.open(uuid="…", name="demo", kind="vnc",
                                target=await tcp_target("127.0.0.1", 5900))
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import termios
import tty
from collections.abc import Callable
from dataclasses import dataclass

from nats.aio.client import Client

from shared import subjects
from shared.console import CHUNK, WINDOW, ConsoleLink
from shared.errors import Unavailable
from shared.messages import new_id
from shared.messages.vm import ConsoleKind, ConsoleSession

log = logging.getLogger("phyllome.vm.console")

CLIENT_WAIT_S = 15.0  # a session nobody listens to within this is closed


class _Reader(asyncio.StreamReader):
    """A StreamReader that first offers the bytes it gets to ``on_data`` (the session's
    ``send_now``), and buffers them for ``read`` only where that declines (no credit now):
    a key's echo goes out in the socket's own callback, no task woken to read it."""

    on_data: Callable[[bytes], bool] | None = None

    def feed_data(self, data: bytes) -> None:  # type: ignore[override]
        if self.on_data is not None and not self._buffer and self.on_data(data):  # type: ignore[attr-defined]
            return
        super().feed_data(data)


@dataclass
class Target:
    """The VM's end of a console: a socket or a pty, as asyncio streams (a pty reads through
    a transport of its own)."""

    reader: _Reader
    writer: asyncio.StreamWriter
    read_transport: asyncio.BaseTransport | None = None

    async def close(self) -> None:
        if self.read_transport is not None:
            self.read_transport.close()
        self.writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await self.writer.wait_closed()


async def tcp_target(host: str, port: int) -> Target:
    """The VNC server of a VM (libvirt's listen address; every-address means loopback)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    loop = asyncio.get_running_loop()
    reader = _Reader(limit=CHUNK)
    protocol = asyncio.StreamReaderProtocol(reader)
    try:
        transport, _ = await asyncio.wait_for(
            loop.create_connection(lambda: protocol, host, port), 5)
    except (OSError, TimeoutError) as e:
        raise Unavailable(f"cannot reach the VM's VNC server at {host}:{port}: {e}") from None
    return Target(reader, asyncio.StreamWriter(transport, protocol, reader, loop))


async def pty_target(path: str) -> Target:
    """The VM's serial port: the pty QEMU holds the other end of, in raw mode (no echo or
    newline translation on this side; the guest's tty does that)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as e:
        raise Unavailable(f"cannot open the VM's serial console {path}: {e.strerror}") from None
    try:
        tty.setraw(fd, termios.TCSANOW)
        loop = asyncio.get_running_loop()
        reader = _Reader(limit=CHUNK)
        out = os.dup(fd)
        read_transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader),
            os.fdopen(fd, "rb", buffering=0, closefd=True))
        transport, protocol = await loop.connect_write_pipe(
            lambda: asyncio.StreamReaderProtocol(asyncio.StreamReader()),
            os.fdopen(out, "wb", buffering=0, closefd=True))
    except OSError as e:
        raise Unavailable(f"cannot use the VM's serial console {path}: {e.strerror}") from None
    return Target(reader, asyncio.StreamWriter(transport, protocol, None, loop), read_transport)


class ConsoleBridge:
    """The open console sessions of this host's VMs."""

    def __init__(self, nc: Client, host: str, *, window: int = WINDOW) -> None:
        self.nc, self.host, self.window = nc, host, window
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.sessions: dict[str, tuple[ConsoleLink, Target]] = {}  # what each one holds

    async def open(self, *, uuid: str, name: str, kind: ConsoleKind,
                   target: Target) -> ConsoleSession:
        session = new_id()
        to_vm = subjects.console(self.host, session, "vm")
        to_client = subjects.console(self.host, session, "client")
        link = ConsoleLink(self.nc, send=to_client, recv=to_vm, window=self.window)
        try:
            await link.start()
        except BaseException:
            await target.close()
            raise
        task = asyncio.create_task(self._pump(link, target, f"{kind} of {name}"),
                                   name=f"console-{session}")
        self._tasks[session] = task
        self.sessions[session] = (link, target)
        task.add_done_callback(lambda _t: (self._tasks.pop(session, None),
                                           self.sessions.pop(session, None)))
        log.info("console session %s: %s of VM %s", session, kind, name)
        return ConsoleSession(session=session, host=self.host, kind=kind, uuid=uuid, name=name,
                              to_vm=to_vm, to_client=to_client, window=self.window)

    @property
    def open_sessions(self) -> int:
        return len(self._tasks)

    async def close(self) -> None:
        """End every session (the agent drains); their clients are told."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _pump(self, link: ConsoleLink, target: Target, what: str) -> None:
        reason = "the vm agent stopped"
        try:
            try:
                await asyncio.wait_for(link.peer_listens.wait(), CLIENT_WAIT_S)
            except TimeoutError:
                reason = f"no client listened within {CLIENT_WAIT_S:.0f} s"
                return
            reason = await self._relay(link, target)
        finally:
            await link.close(reason, tell=not link.closed.is_set())
            await target.close()
            log.info("console %s closed: %s", what, link.reason)

    @staticmethod
    async def _relay(link: ConsoleLink, target: Target) -> str:
        async def to_client() -> str:
            # the bytes go out as they come (send_now); here only what waited for credit
            target.reader.on_data = link.send_now
            while data := await target.reader.read(CHUNK):
                await link.send(data)
            return "the VM's console closed (the VM stopped?)"

        async def write(data: bytes) -> None:
            target.writer.write(data)
            await target.writer.drain()

        async def to_vm() -> str:
            return await link.deliver(write)  # in the NATS reader's task: no queue

        tasks = [asyncio.create_task(to_client()), asyncio.create_task(to_vm())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            first = done.pop()
            try:
                return first.result()
            except (OSError, ConnectionError) as e:
                return f"the VM's console failed: {e}"
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
