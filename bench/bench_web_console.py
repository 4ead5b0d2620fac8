"""Consoles through the web gateway — a WebSocket to the gateway, NATS to the vm agent's
bridge, TCP to the console — beside ``websockify`` straight to the same TCP port (what a
noVNC user runs without Phyllome), same machine, same run:

- round trip: 64 bytes to an echo server and back (a key press and the update it causes,
  less the VNC server's own time), p50; goal: at most 1.2 times websockify's;
- throughput: a console server that writes as fast as it can, read through the relay;
  goal: at least 50 MB/s.

The vm agent's half is the real ``ConsoleBridge`` behind a ``vm.console`` endpoint that
points it at these servers (a guest's VNC server adds the same time to both paths).

    python -m bench.bench_web_console [--quick]
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from websockets.asyncio.client import connect

from bench.common import Result, percentile
from services.vm.console_bridge import ConsoleBridge, tcp_target
from services.web.config import load
from services.web.service import WebGateway
from shared import tokens
from shared.bus import Bus
from shared.console import CHUNK, WINDOW
from shared.messages import vm as vm_api
from shared.messages.vm import ConsoleOpen, ConsoleSession
from shared.natsserver import NatsServer

HOST = "h1"
BLOCK = os.urandom(1 << 20)


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(1 << 16):
        writer.write(data)
        await writer.drain()
    writer.close()


async def blast(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            writer.write(BLOCK)
            await writer.drain()
    except (ConnectionError, OSError):
        writer.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def websockify(target: int) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    proc = subprocess.Popen(["websockify", f"127.0.0.1:{port}", f"127.0.0.1:{target}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, port
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("websockify did not listen") from None
            await asyncio.sleep(0.05)


async def round_trip(url: str, headers: dict[str, str], rounds: int) -> tuple[float, float]:
    """p50 of the round trips, and this process's CPU per round trip (seconds)."""
    times = []
    async with connect(url, additional_headers=headers, subprotocols=["binary"],  # type: ignore[list-item]
                       max_size=None) as ws:
        message = b"k" * 64
        cpu = time.process_time()
        for _ in range(rounds):
            t = time.perf_counter()
            await ws.send(message)
            got = b""
            while len(got) < len(message):
                got += await ws.recv()  # type: ignore[operator]
            times.append(time.perf_counter() - t)
        cpu = (time.process_time() - cpu) / rounds
    return percentile(times, 50), cpu


async def throughput(url: str, headers: dict[str, str], total: int) -> float:
    async with connect(url, additional_headers=headers, subprotocols=["binary"],  # type: ignore[list-item]
                       max_size=None) as ws:
        got = len(await ws.recv())  # the first bytes: the stream runs
        t = time.perf_counter()
        while got < total:
            got += len(await ws.recv())
        return got / (time.perf_counter() - t) / 1e6


async def run(quick: bool = False) -> list[Result]:
    if shutil.which("websockify") is None:
        raise RuntimeError("websockify (Debian package websockify, with novnc) is needed")
    echo_server = await asyncio.start_server(echo, "127.0.0.1", 0)
    blast_server = await asyncio.start_server(blast, "127.0.0.1", 0)
    echo_port = echo_server.sockets[0].getsockname()[1]
    blast_port = blast_server.sockets[0].getsockname()[1]
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        server = NatsServer(Path(tmp) / "nats", port=-1)
        server.start()
        agent = await Bus.connect(server.url, name="bench-vm", host=HOST, give_up_after=5)
        bridge = ConsoleBridge(agent.nc, HOST)

        async def console(req: ConsoleOpen) -> ConsoleSession:
            port = echo_port if req.kind == "vnc" else blast_port
            return await bridge.open(uuid="bench", name=req.vm, kind=req.kind,
                                     target=await tcp_target("127.0.0.1", port))

        gateway = WebGateway(load({"PHYLLOME_HOST": "h0", "PHYLLOME_NATS_URL": server.url,
                                   "PHYLLOME_WEB_LISTEN": "127.0.0.1:0"}))
        try:
            await agent.ensure_stream()
            await agent.serve("vm", "0.0.0", [(vm_api.CONSOLE, console)],
                              metadata={"host": HOST})
            await gateway.start()
            token, _ = await tokens.create(agent, "bench", "operator")
            auth = {"authorization": f"Bearer {token}"}
            ours = gateway.url.replace("http://", "ws://") + "/api/v1/vms/bench/console"
            ws_echo, echo_ws_port = await websockify(echo_port)
            ws_blast, blast_ws_port = await websockify(blast_port)
            procs += [ws_echo, ws_blast]
            rounds, total = (100, 32 << 20) if quick else (500, 256 << 20)
            rtt_ours, cpu_ours = await round_trip(f"{ours}/vnc?host={HOST}", auth, rounds)
            rtt_theirs, cpu_theirs = await round_trip(f"ws://127.0.0.1:{echo_ws_port}/", {},
                                                      rounds)
            mbs_ours = await throughput(f"{ours}/serial?host={HOST}", auth, total)
            mbs_theirs = await throughput(f"ws://127.0.0.1:{blast_ws_port}/", {}, total)
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait()
            await gateway.close()
            await bridge.close()
            await agent.close()
            server.stop()
            echo_server.close()
            blast_server.close()
    return [
        Result("web console round trip", "64 B to an echo server and back, p50",
               rtt_ours * 1000, rtt_theirs * 1000, "websockify straight to the port", "ms",
               "≥ 0.83x (≤ 1.2x websockify)",
               note="browser WS -> gateway -> NATS -> vm agent bridge -> TCP; CPU per round "
                    f"trip in the bench's process {cpu_ours * 1e6:.0f} µs (client, gateway, "
                    f"bridge, echo server), {cpu_theirs * 1e6:.0f} µs with websockify (client, "
                    f"echo server; websockify runs in its own)"),
        Result("web console throughput", f"{total >> 20} MiB from the console", mbs_ours,
               mbs_theirs, "websockify straight to the port", "MB/s", "≥ 50 MB/s",
               higher_is_better=True,
               note=f"credit window {WINDOW >> 20} MiB, messages up to {CHUNK >> 10} KiB; the "
                    "client, gateway, bridge and console server share one process"),
    ]


if __name__ == "__main__":
    for r in asyncio.run(run("--quick" in sys.argv)):
        print(r.row())
