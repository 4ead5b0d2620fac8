"""Consoles through the web gateway — a WebSocket to the gateway, NATS to the vm agent's
bridge, TCP to the console — beside ``websockify`` straight to the same TCP port (what a
noVNC user runs without Phyllome), same machine, same run:

- round trip: 64 bytes to an echo server and back (a key press and the update it causes,
  less the VNC server's own time), p50; goal: at most 1.2 times websockify's. Beside it,
  the same with the gateway and the bridge in one process, and relays that do no work in
  the place of our three processes (gateway, nats-server, vm agent): three ``socat``, and
  Python, socat, Python: the floor that process wake-ups and loopback sends set for any
  relay of that shape;
- throughput: a console server that writes as fast as it can, read through the relay;
  goal: at least 50 MB/s.

Each runs in its own process, as ``phyllome up`` runs them: the gateway is the real
``python -m services.web``; the vm agent's half is the real ``ConsoleBridge`` behind a
``vm.console`` endpoint that points it at these servers (a guest's VNC server adds the same
time to both paths), each on the event loop it runs on (``shared.runtime.run_loop``). The client
(the browser) and the echo and console servers (the VM) share the bench's process, for
both paths.

    python -m bench.bench_web_console [--quick]
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from websockets.asyncio.client import connect

from bench.common import Result, cpu_seconds, percentile
from services.vm.console_bridge import ConsoleBridge, tcp_target
from services.web.config import load
from services.web.service import WebGateway
from shared import tokens
from shared.bus import Bus
from shared.console import CHUNK, WINDOW
from shared.messages import vm as vm_api
from shared.messages.vm import ConsoleOpen, ConsoleSession
from shared.natsserver import NatsServer
from shared.runtime import run_loop

HOST = "h1"
BLOCKS = 5  # alternate blocks of round trips, ours then websockify's
REPO = Path(__file__).resolve().parents[1]
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


async def round_trips(url: str, headers: dict[str, str], rounds: int) -> list[float]:
    """The time of each of ``rounds`` round trips (seconds)."""
    times = []
    async with connect(url, additional_headers=headers, subprotocols=["binary"],  # type: ignore[list-item]
                       max_size=None) as ws:
        message = b"k" * 64
        for _ in range(rounds):
            t = time.perf_counter()
            await ws.send(message)
            got = b""
            while len(got) < len(message):
                got += await ws.recv()  # type: ignore[operator]
            times.append(time.perf_counter() - t)
    return times


async def alternately(ours: tuple[str, dict[str, str]], theirs: str, rounds: int,
                      pids: Sequence[int] = ()) -> tuple[float, float, float]:
    """p50 of ours and of theirs, measured in alternate blocks (so a change of the machine's
    load falls on both), and the CPU the processes ``pids`` took per round trip of ours."""
    mine: list[float] = []
    other: list[float] = []
    cpu = 0.0
    for _ in range(BLOCKS):
        before = sum(cpu_seconds(pid) for pid in pids)
        mine += await round_trips(ours[0], ours[1], rounds // BLOCKS)
        cpu += sum(cpu_seconds(pid) for pid in pids) - before
        other += await round_trips(theirs, {}, rounds // BLOCKS)
    return percentile(mine, 50), percentile(other, 50), cpu / len(mine)


async def throughput(url: str, headers: dict[str, str], total: int) -> float:
    async with connect(url, additional_headers=headers, subprotocols=["binary"],  # type: ignore[list-item]
                       max_size=None) as ws:
        got = len(await ws.recv())  # the first bytes: the stream runs
        t = time.perf_counter()
        while got < total:
            got += len(await ws.recv())
        return got / (time.perf_counter() - t) / 1e6


async def bridge(nats_url: str, echo_port: int, blast_port: int) -> None:
    """The vm agent's half, in a process of its own (``--bridge``): ``vm.console`` answers
    a session bridged to the echo server (vnc) or the blasting one (serial)."""
    agent = await Bus.connect(nats_url, name="bench-vm", host=HOST, give_up_after=5)
    consoles = ConsoleBridge(agent.nc, HOST)

    async def console(req: ConsoleOpen) -> ConsoleSession:
        port = echo_port if req.kind == "vnc" else blast_port
        return await consoles.open(uuid="bench", name=req.vm, kind=req.kind,
                                   target=await tcp_target("127.0.0.1", port))

    await agent.serve("vm", "0.0.0", [(vm_api.CONSOLE, console)], metadata={"host": HOST})
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until EOF
    await consoles.close()
    await agent.close()


async def wait_port(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"{what} did not listen on {port}") from None
            await asyncio.sleep(0.05)


async def relays(kinds: list[str], target: int) -> tuple[list[subprocess.Popen[bytes]], int]:
    """A chain of relay processes to ``target`` doing no work on the bytes, the last of
    ``kinds`` first in the path: ``socat`` (C) or ``python`` (``--relay``, on uvloop); the
    port of the chain's front."""
    procs, port = [], target
    for kind in kinds:
        listen = free_port()
        cmd = (["socat", f"TCP-LISTEN:{listen},reuseaddr,fork,nodelay",
                f"TCP:127.0.0.1:{port},nodelay"] if kind == "socat" else
               [sys.executable, "-m", "bench.bench_web_console", "--relay", str(listen),
                str(port)])
        procs.append(subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.DEVNULL))
        await wait_port(listen, procs[-1], kind)
        port = listen
    return procs, port


async def relay(listen: int, target: int) -> None:
    """Relay each connection to ``target``, bytes as they come (``--relay``)."""
    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1 << 16):
            writer.write(data)
        writer.close()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        to_reader, to_writer = await asyncio.open_connection("127.0.0.1", target)
        with contextlib.suppress(ConnectionError):
            await asyncio.gather(pump(reader, to_writer), pump(to_reader, writer))

    server = await asyncio.start_server(serve, "127.0.0.1", listen)
    await server.serve_forever()


def round_trip(measure: str, ours: float, theirs: float, target: str, note: str) -> Result:
    """A row of round trips (seconds) beside websockify's."""
    return Result("web console round trip", measure, ours * 1000, theirs * 1000,
                  "websockify straight to the port", "ms", target, note=note)


async def raw_round_trips(port: int, rounds: int) -> list[float]:
    """64 B round trips over plain TCP (no WebSocket: socat relays bytes as they are)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        writer.write(b"k" * 64)
        got = 0
        while got < 64:
            got += len(await reader.read(1 << 16))
        times.append(time.perf_counter() - t)
    writer.close()
    return times


async def raw_alternately(port: int, ws_port: int, rounds: int) -> tuple[float, float]:
    """p50 through the socat chain at ``port`` and through websockify, alternate blocks."""
    mine: list[float] = []
    other: list[float] = []
    for _ in range(BLOCKS):
        mine += await raw_round_trips(port, rounds // BLOCKS)
        other += await round_trips(f"ws://127.0.0.1:{ws_port}/", {}, rounds // BLOCKS)
    return percentile(mine, 50), percentile(other, 50)


async def together(quick: bool) -> tuple[float, float]:
    """Round trips with the gateway and the bridge in this process (``--together``, run on
    uvloop like them), beside websockify: what the two relays cost, less the wake-ups of
    two processes of their own."""
    echo_server = await asyncio.start_server(echo, "127.0.0.1", 0)
    echo_port = echo_server.sockets[0].getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        server = NatsServer(Path(tmp) / "nats", port=-1)
        server.start()
        agent = await Bus.connect(server.url, name="bench-vm", host=HOST, give_up_after=5)
        consoles = ConsoleBridge(agent.nc, HOST)

        async def console(req: ConsoleOpen) -> ConsoleSession:
            return await consoles.open(uuid="bench", name=req.vm, kind=req.kind,
                                       target=await tcp_target("127.0.0.1", echo_port))

        gateway = WebGateway(load({"PHYLLOME_HOST": "h0", "PHYLLOME_NATS_URL": server.url,
                                   "PHYLLOME_WEB_LISTEN": "127.0.0.1:0"}))
        proc = None
        try:
            await agent.ensure_stream()
            await agent.serve("vm", "0.0.0", [(vm_api.CONSOLE, console)],
                              metadata={"host": HOST})
            await gateway.start()
            token, _ = await tokens.create(agent, "bench", "operator")
            ours = (gateway.url.replace("http://", "ws://")
                    + f"/api/v1/vms/bench/console/vnc?host={HOST}",
                    {"authorization": f"Bearer {token}"})
            proc, port = await websockify(echo_port)
            p50_ours, p50_theirs, _ = await alternately(ours, f"ws://127.0.0.1:{port}/",
                                                        100 if quick else 2000)
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait()
            await gateway.close()
            await consoles.close()
            await agent.close()
            server.stop()
            echo_server.close()
    return p50_ours, p50_theirs


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
        bus = await Bus.connect(server.url, name="bench", host=HOST, give_up_after=5)
        try:
            await bus.ensure_stream()
            vm_side = subprocess.Popen(
                [sys.executable, "-m", "bench.bench_web_console", "--bridge", server.url,
                 str(echo_port), str(blast_port)], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, cwd=REPO)
            procs.append(vm_side)
            assert vm_side.stdout is not None
            if await asyncio.to_thread(vm_side.stdout.readline) != b"ready\n":
                raise RuntimeError("the bench's vm agent half did not start")
            web_port = free_port()
            web = subprocess.Popen(
                [sys.executable, "-m", "services.web"], cwd=REPO, stderr=subprocess.DEVNULL,
                env={**os.environ, "PHYLLOME_HOST": "h0", "PHYLLOME_NATS_URL": server.url,
                     "PHYLLOME_WEB_LISTEN": f"127.0.0.1:{web_port}",
                     "PHYLLOME_LOG_LEVEL": "WARNING"})
            procs.append(web)
            await wait_port(web_port, web, "the web gateway")
            token, _ = await tokens.create(bus, "bench", "operator")
            auth = {"authorization": f"Bearer {token}"}
            ours = f"ws://127.0.0.1:{web_port}/api/v1/vms/bench/console"
            ws_echo, echo_ws_port = await websockify(echo_port)
            ws_blast, blast_ws_port = await websockify(blast_port)
            procs += [ws_echo, ws_blast]
            rounds, total = (100, 32 << 20) if quick else (2000, 256 << 20)
            pids = [web.pid, vm_side.pid, server.proc.pid]  # type: ignore[union-attr]
            rtt_ours, rtt_theirs, cpu = await alternately(
                (f"{ours}/vnc?host={HOST}", auth), f"ws://127.0.0.1:{echo_ws_port}/", rounds,
                pids)
            socats = await relays(["socat"] * 3, echo_port)
            procs += socats[0]
            rtt_floor, rtt_theirs_too = await raw_alternately(socats[1], echo_ws_port, rounds)
            mixed = await relays(["python", "socat", "python"], echo_port)
            procs += mixed[0]
            rtt_mixed, rtt_theirs_3 = await raw_alternately(mixed[1], echo_ws_port, rounds)
            mbs_ours = await throughput(f"{ours}/serial?host={HOST}", auth, total)
            mbs_theirs = await throughput(f"ws://127.0.0.1:{blast_ws_port}/", {}, total)
            each = [cpu_seconds(pid) for pid in pids]
            await round_trips(f"{ours}/vnc?host={HOST}", auth, rounds // 2)
            each = [(cpu_seconds(pid) - e) / (rounds // 2) for pid, e in zip(pids, each,
                                                                             strict=True)]
        finally:
            for proc in procs:
                if proc.stdin is not None:
                    proc.stdin.close()
                else:
                    proc.terminate()
                proc.wait()
            await bus.close()
            server.stop()
            echo_server.close()
            blast_server.close()
    one = subprocess.run([sys.executable, "-m", "bench.bench_web_console", "--together"]
                         + (["--quick"] if quick else []), cwd=REPO, check=True,
                         capture_output=True, text=True).stdout.split()
    one_ours, one_theirs = float(one[-2]), float(one[-1])
    return [
        round_trip("64 B to an echo server and back, p50", rtt_ours, rtt_theirs,
                   "≥ 0.83x (≤ 1.2x websockify)",
                   "as deployed: browser WS -> gateway (python -m services.web) -> NATS -> "
                   "vm agent's bridge (its own process) -> TCP, eight process wake-ups a "
                   "round trip where websockify's path has four; CPU per round trip: gateway "
                   f"{each[0] * 1e6:.0f} µs, bridge {each[1] * 1e6:.0f} µs, nats-server "
                   f"{each[2] * 1e6:.0f} µs; {BLOCKS} alternate blocks of each path"),
        round_trip("the same, gateway and bridge in one process, p50", one_ours, one_theirs,
                   "-", "both relays on one uvloop loop with the client and the echo server "
                   "(the bench's first layout): the relays' own cost, four wake-ups a round "
                   "trip like websockify's"),
        round_trip("64 B through three socat relays, no WebSocket, p50", rtt_floor,
                   rtt_theirs_too, "-", "a floor, not our code: three processes in the path "
                   "(as the gateway, nats-server and the vm agent are) that do nothing but "
                   "relay bytes, in C; what wake-ups and loopback sends alone cost on this "
                   "machine"),
        round_trip("64 B through Python, socat, Python relays, p50", rtt_mixed, rtt_theirs_3,
                   "-", "the shape of our path with no protocol at all: two Python processes "
                   "(uvloop) that only pass bytes on, where the gateway and the bridge are, "
                   "and socat where nats-server is"),
        Result("web console throughput", f"{total >> 20} MiB from the console", mbs_ours,
               mbs_theirs, "websockify straight to the port", "MB/s", "≥ 50 MB/s",
               higher_is_better=True,
               note=f"credit window {WINDOW >> 20} MiB, messages up to {CHUNK >> 10} KiB; as "
                    "deployed (gateway and bridge each in a process of its own)"),
    ]


if __name__ == "__main__":
    if sys.argv[1:2] == ["--bridge"]:
        run_loop(bridge(sys.argv[2], int(sys.argv[3]), int(sys.argv[4])), uv=False)  # as vm
    elif sys.argv[1:2] == ["--relay"]:
        run_loop(relay(int(sys.argv[2]), int(sys.argv[3])), uv=True)
    elif sys.argv[1:2] == ["--together"]:
        print(*run_loop(together("--quick" in sys.argv), uv=True))
    else:
        for r in asyncio.run(run("--quick" in sys.argv)):
            print(r.row())
