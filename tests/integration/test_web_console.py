"""Consoles over NATS with a real nats-server: the session protocol (``shared/console.py``),
the vm agent's bridge to a real TCP socket and a real pty, and the gateway's WebSocket
refusals (libvirt's test driver runs no VNC server;
tests/system/test_web_guest_console.py opens a real guest's)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import types
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from services.vm.console_bridge import ConsoleBridge, pty_target, tcp_target
from services.web.wsfast import DirectWebSockets
from shared import subjects
from shared.bus import Bus
from shared.console import CHUNK, ConsoleLink
from shared.messages import vm as vm_api
from shared.messages.vm import ConsoleOpen, ConsoleSession
from shared.natsserver import NatsServer
from tests.support.agents import agent_in_process
from tests.support.wait import until
from tests.support.web import bearer, gateway_in_process, make_token

pytestmark = pytest.mark.integration


@contextlib.asynccontextmanager
async def bus_of(nats: NatsServer) -> AsyncIterator[Bus]:
    bus = await Bus.connect(nats.url, name="test", host="h1", give_up_after=5)
    try:
        yield bus
    finally:
        await bus.close()


class Plain:
    """A NATS client as nats-py's public API shows it: a link's fast ways (its own queue in
    the subscription, its writes onto the socket) find no insides and fall back."""

    def __init__(self, nc: Any) -> None:
        self.nc = nc
        self.is_connected, self.max_payload = nc.is_connected, nc.max_payload

    async def publish(self, subject: str, payload: bytes, reply: str = "",
                      headers: dict[str, str] | None = None) -> None:
        await self.nc.publish(subject, payload, reply=reply, headers=headers)

    async def subscribe(self, subject: str, cb: Any = None) -> Any:
        sub = await self.nc.subscribe(subject, cb=cb)
        return types.SimpleNamespace(unsubscribe=sub.unsubscribe)


async def pair(bus: Bus, window: int = 64 << 10, plain: bool = False,
               **kw: float) -> tuple[ConsoleLink, ConsoleLink]:
    """(client, vm) ends of one session."""
    to_vm, to_client = subjects.console("h1", "s1", "vm"), subjects.console("h1", "s1", "client")
    nc: Any = Plain(bus.nc) if plain else bus.nc
    vm = ConsoleLink(nc, send=to_client, recv=to_vm, window=window, **kw)
    client = ConsoleLink(nc, send=to_vm, recv=to_client, window=window, **kw)
    await vm.start()
    await client.start(opener=True)
    await asyncio.wait_for(vm.peer_listens.wait(), 5)
    return client, vm


@pytest.mark.parametrize("plain", [False, True], ids=["fast", "public-api"])
async def test_a_session_carries_bytes_both_ways_within_its_window(
        nats_server: NatsServer, plain: bool) -> None:
    async with bus_of(nats_server) as bus:
        client, vm = await pair(bus, plain=plain)
        data = os.urandom(300 << 10)
        sending = asyncio.create_task(vm.send(data))
        # the client reads nothing: the VM's end stops at the window, and waits
        await until("the window to fill", lambda: client.buffered == 64 << 10, timeout=10)
        assert not sending.done() and vm.unacked == 64 << 10
        got = b""
        while len(got) < len(data):
            chunk = await client.recv()
            assert chunk is not None
            got += chunk
        await asyncio.wait_for(sending, 10)
        assert got == data
        await client.send(b"keys")
        assert await vm.recv() == b"keys"
        # nats-py's insides as the fast ways expect (else they fall back, slower, unseen)
        fast = client.direct and vm.direct and vm.written_now > 0 and client.written_now > 0
        assert fast != plain
        await client.close("the browser closed the console")
        assert await vm.recv() is None
        assert vm.reason == "the browser closed the console"


async def test_deliver_hands_bytes_to_a_sink_in_order_with_credit_and_its_errors(
        nats_server: NatsServer) -> None:
    """The relays' way in: no queue, bytes acknowledged as the sink takes them, what came
    before first; a sink that fails raises in deliver() with the session still open."""
    async with bus_of(nats_server) as bus:
        client, vm = await pair(bus)
        await vm.send(b"greeting ")  # before the client delivers: queued, then first
        await until("the greeting queued", lambda: client.buffered == 9, timeout=5)
        got = bytearray()
        gate = asyncio.Event()
        gate.set()

        async def sink(data: bytes) -> None:
            await gate.wait()
            got.extend(data)

        delivering = asyncio.create_task(client.deliver(sink))
        data = os.urandom(300 << 10)
        await vm.send(data[:100 << 10])
        await until("100 KiB delivered", lambda: len(got) == 9 + (100 << 10), timeout=10)
        gate.clear()  # the sink stalls: the sender stops at the window
        sending = asyncio.create_task(vm.send(data[100 << 10:]))
        await until("the window to fill", lambda: vm.unacked == 64 << 10, timeout=10)
        assert not sending.done()
        gate.set()
        await asyncio.wait_for(sending, 10)
        await until("all delivered", lambda: len(got) == 9 + len(data), timeout=10)
        assert bytes(got) == b"greeting " + data
        await vm.close("the VM stopped")
        assert await asyncio.wait_for(delivering, 5) == "the VM stopped"

        client, vm = await pair(bus)

        async def broken(data: bytes) -> None:
            raise ConnectionResetError("the browser went away")

        delivering = asyncio.create_task(client.deliver(broken))
        await vm.send(b"frame")
        with pytest.raises(ConnectionResetError, match="the browser went away"):
            await asyncio.wait_for(delivering, 5)
        assert not client.closed.is_set()  # its owner closes it, telling the peer
        await client.close("the browser went away")
        await asyncio.wait_for(vm.closed.wait(), 5)
        assert vm.reason == "the browser went away"


async def test_a_lost_message_or_a_silent_peer_ends_the_session(
        nats_server: NatsServer) -> None:
    async with bus_of(nats_server) as bus:
        client, vm = await pair(bus)
        await vm.send(b"one")
        assert await client.recv() == b"one"
        # a data message is numbered by its reply subject; the first protocol's header is
        # read too
        await bus.nc.publish(vm.send_subject, b"two", headers={"Phy-Seq": "2"})
        assert await client.recv() == b"two"
        await bus.nc.publish(vm.send_subject, b"four", reply="4")
        assert await client.recv() is None
        assert "console data lost on the way (message 4 after 2)" in client.reason
        await asyncio.wait_for(vm.closed.wait(), 5)  # told
        lonely = ConsoleLink(bus.nc, send=subjects.console("h1", "s2", "vm"),
                             recv=subjects.console("h1", "s2", "client"), ping_s=0.1, idle_s=0.3)
        await lonely.start(opener=True)
        await asyncio.wait_for(lonely.closed.wait(), 5)
        assert lonely.reason == "nothing heard from the other end for 0 s"


async def test_the_bridge_relays_a_vnc_socket_and_a_serial_pty(nats_server: NatsServer) -> None:
    async def vnc_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"RFB 003.008\n")  # greets at once, as QEMU's does
        while data := await reader.read(100):
            writer.write(data.upper())
        writer.close()

    server = await asyncio.start_server(vnc_server, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    master, slave = os.openpty()
    async with bus_of(nats_server) as bus:
        bridge = ConsoleBridge(bus.nc, "h1", window=1 << 16)
        try:
            vnc = await bridge.open(uuid="u1", name="demo", kind="vnc",
                                    target=await tcp_target("0.0.0.0", port))
            client = ConsoleLink(bus.nc, send=vnc.to_vm, recv=vnc.to_client)
            await client.start(opener=True)
            assert await client.recv() == b"RFB 003.008\n"  # sent before we listened: kept
            await client.send(b"hello")
            assert await client.recv() == b"HELLO"

            serial = await bridge.open(uuid="u1", name="demo", kind="serial",
                                       target=await pty_target(os.ttyname(slave)))
            assert bridge.open_sessions == 2
            term = ConsoleLink(bus.nc, send=serial.to_vm, recv=serial.to_client)
            await term.start(opener=True)
            os.write(master, b"login: ")
            assert await term.recv() == b"login: "
            await term.send(b"root\r")
            os.set_blocking(master, False)
            typed = bytearray()

            def guest_read() -> bool:
                with contextlib.suppress(BlockingIOError):
                    typed.extend(os.read(master, 100))
                return bytes(typed) == b"root\r"

            await until("the guest to read the line", guest_read, timeout=5)
            os.close(master)  # the VM stops: QEMU closes its end
            assert await asyncio.wait_for(term.recv(), 10) is None
            assert term.reason.startswith("the VM's console")
        finally:
            await bridge.close()
            server.close()
            os.close(slave)
        assert await asyncio.wait_for(client.recv(), 5) is None
        assert client.reason == "the vm agent stopped"
        assert bridge.open_sessions == 0


async def test_the_console_websocket_closes_with_a_code_that_says_why(
        nats_server: NatsServer, tmp_path: Path, libvirt_test_uri: str) -> None:
    async with agent_in_process(
        "vm", nats_server.url, tmp_path, host="h1", libvirt_uri=libvirt_test_uri,
        accelerator="tcg", extra={"reconcile_s": 3600},
    ) as _agent, gateway_in_process(nats_server.url, "h1") as gw, httpx.AsyncClient(
            base_url=gw.url) as http:
        op = await make_token(gw.bus, "op", "operator")
        viewer = await make_token(gw.bus, "view", "viewer")
        for name in ("off", "on"):
            r = await http.post("/api/v1/vms", headers=bearer(op),
                                json={"spec": {"name": name, "memory_mib": 64}})
            assert r.status_code == 201, r.text
        await http.post("/api/v1/vms/on/start", headers=bearer(op))
        ws_url = gw.url.replace("http://", "ws://")

        async def closed(path: str, token: str | None) -> tuple[int, str]:
            headers = bearer(token) if token else {}
            async with connect(ws_url + path, additional_headers=headers) as ws:
                with pytest.raises(ConnectionClosed) as e:
                    await asyncio.wait_for(ws.recv(), 10)
            assert e.value.rcvd is not None
            return e.value.rcvd.code, e.value.rcvd.reason

        cases = [
            ("/api/v1/vms/on/console/vnc", None, 4401, "no token"),
            ("/api/v1/vms/on/console/vnc", "phy_nonsense", 4401, "unknown or revoked token"),
            ("/api/v1/vms/on/console/vnc", viewer, 4403,
             "token 'view' is a viewer; the vnc console needs operator"),
            ("/api/v1/vms/ghost/console/serial", op, 4404, "no VM named 'ghost'"),
            ("/api/v1/vms/off/console/vnc", op, 4409, "VM off is shutoff: start it"),
            ("/api/v1/vms/on/console/vnc", op, 4409, "VM on has no VNC display"),
            ("/api/v1/vms/on/console/serial", op, 4409, "has no serial pty to open"),
            ("/api/v1/vms/on/console/vnc?host=h9", op, 4503, "no vm agent for host 'h9'"),
        ]
        for path, token, code, reason in cases:
            got = await closed(path, token)
            assert got[0] == code and reason in got[1], (path, got)
        r = await http.get("/metrics")
        assert 'phyllome_web_consoles_open{kind="vnc"} 0.0' not in r.text  # none was opened


async def test_a_browser_that_does_not_read_stops_the_console_within_the_window(
        nats_server: NatsServer) -> None:
    """Flow control end to end: a WebSocket that reads nothing pauses the gateway's sink,
    the credit runs out, the bridge stops reading the VM's socket; what the bridge holds
    stays within the window and its read buffer, and the stream then goes on intact."""
    written = 0
    blocked = asyncio.Event()
    pattern = bytes(range(251)) * 40  # byte i of the stream is i % 251


    async def console_server(_r: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal written
        writer.transport.set_write_buffer_limits(high=4 << 20)
        with contextlib.suppress(ConnectionError, OSError):
            while True:
                at = written % 251
                writer.write(pattern[at:at + 8192])
                written += 8192
                if writer.transport.get_write_buffer_size() > 1 << 20:
                    blocked.set()  # the kernel's buffers are full: nobody reads
                await writer.drain()

    server = await asyncio.start_server(console_server, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    window = 256 << 10
    async with bus_of(nats_server) as agent, gateway_in_process(nats_server.url, "h0") as gw:
        bridge = ConsoleBridge(agent.nc, "h1", window=window)

        async def console(req: ConsoleOpen) -> ConsoleSession:
            return await bridge.open(uuid="u1", name=req.vm, kind=req.kind,
                                     target=await tcp_target("127.0.0.1", port))

        await agent.serve("vm", "0.0.0", [(vm_api.CONSOLE, console)], metadata={"host": "h1"})
        token = await make_token(gw.bus, "op", "operator")
        url = gw.url.replace("http://", "ws://") + "/api/v1/vms/demo/console/serial?host=h1"
        try:
            async with connect(url, additional_headers=bearer(token), max_size=None,
                               max_queue=1) as ws:
                first = await asyncio.wait_for(ws.recv(), 10)  # the stream runs
                got = bytearray(first if isinstance(first, bytes) else first.encode())
                blocked.clear()  # the bridge reads now: the server blocks only once it stops
                await asyncio.wait_for(blocked.wait(), 20)
                ((link, target),) = bridge.sessions.values()
                assert 0 < link.unacked <= window, link.unacked  # the browser holds it up
                held = len(target.reader._buffer)  # type: ignore[attr-defined]
                assert held <= 2 * CHUNK + (256 << 10)  # StreamReader pauses over 2 limits
                want = written + (4 << 20)  # all that was written, in order, and more
                while len(got) < want:
                    got += await asyncio.wait_for(ws.recv(), 10)  # type: ignore[arg-type]
                assert got[:want] == (bytes(range(251)) * (want // 251 + 1))[:want]
        finally:
            await bridge.close()
            server.close()


async def test_keys_go_on_in_the_sockets_callback_then_queue_in_order_when_the_vm_reads_nothing(
        nats_server: NatsServer) -> None:
    """The other way: the gateway passes a browser's binary message on in the WebSocket's
    own callback (``services/web/wsfast.py``) while the session has credit; a VM that reads
    nothing stops the credit, the messages then wait in uvicorn's queue (its reading of the
    browser paused), and once the VM reads, every byte arrives, in order."""
    got = bytearray()
    reading = asyncio.Event()

    async def vm_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reading.wait()
            while data := await reader.read(1 << 16):
                got.extend(data)
        finally:
            writer.close()

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 << 10)  # the VM's socket fills
    sock.bind(("127.0.0.1", 0))
    server = await asyncio.start_server(vm_server, sock=sock)
    port = sock.getsockname()[1]
    window = 256 << 10
    async with bus_of(nats_server) as agent, gateway_in_process(nats_server.url, "h0") as gw:
        bridge = ConsoleBridge(agent.nc, "h1", window=window)

        async def console(req: ConsoleOpen) -> ConsoleSession:
            target = await tcp_target("127.0.0.1", port)
            target.writer.transport.set_write_buffer_limits(high=32 << 10)
            return await bridge.open(uuid="u1", name=req.vm, kind=req.kind, target=target)

        await agent.serve("vm", "0.0.0", [(vm_api.CONSOLE, console)], metadata={"host": "h1"})
        token = await make_token(gw.bus, "op", "operator")
        url = gw.url.replace("http://", "ws://") + "/api/v1/vms/demo/console/vnc?host=h1"
        taken, declined = DirectWebSockets.taken, DirectWebSockets.declined
        sent = bytes(range(251)) * 128 * 1024  # 32 MiB (more than TCP buffers), byte i: i % 251
        try:
            async with connect(url, additional_headers=bearer(token), max_size=None) as ws:
                async def send_all() -> None:
                    for at in range(0, len(sent), 16 << 10):
                        await ws.send(sent[at:at + (16 << 10)])

                sending = asyncio.create_task(send_all())
                await until("the gateway to run out of credit",
                            lambda: DirectWebSockets.declined > declined, timeout=20)
                assert DirectWebSockets.taken > taken  # the first ones went on at once
                ((link, _target),) = bridge.sessions.values()
                assert link.buffered <= 2 * window  # what the bridge holds stays bounded
                await asyncio.sleep(0.5)  # time to send more, were the browser not held up
                assert not got and not sending.done()
                reading.set()
                await asyncio.wait_for(sending, 30)
                await until("every byte at the VM", lambda: len(got) >= len(sent),
                            timeout=30)
                assert bytes(got) == sent
        finally:
            await bridge.close()
            server.close()
            await server.wait_closed()
