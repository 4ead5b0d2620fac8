"""Bus overhead: a micro endpoint with msgspec vs a bare nats-py handler; event publish with
Nats-Msg-Id (pipelined) vs bare ``js.publish_async`` — same server, same run.

    python -m bench.bench_bus [--quick]
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import nats
from nats.aio.msg import Msg

from bench.common import Result, percentile
from shared import subjects
from shared.agent import Agent
from shared.bus import Bus
from shared.config import load
from shared.messages import AgentStopping, EndpointSpec
from shared.natsserver import NatsServer


class Ping(msgspec.Struct, frozen=True, kw_only=True, tag="bench.ping.v1"):
    n: int = 0
    text: str = "hello"


class Handlers:
    async def ping(self, req: Ping) -> Ping:
        return req


async def _setup(agent: Agent) -> Handlers:
    return Handlers()


async def request_latency(url: str, tmp: Path, count: int) -> list[Result]:
    cfg = msgspec.structs.replace(load("catalogue", env={
        "PHYLLOME_HOST": "bench", "PHYLLOME_NATS_URL": url, "PHYLLOME_STATE_DIR": str(tmp),
        "PHYLLOME_CATALOGUE_METRICS_PORT": "0"}))
    agent = Agent("catalogue", cfg)
    await agent.start(_setup, (EndpointSpec("catalogue", "ping", Ping, Ping, "echo"),))
    bare = await nats.connect(url)
    payload = msgspec.json.encode(Ping(n=1))

    async def bare_handler(msg: Msg) -> None:
        await msg.respond(msg.data)

    await bare.subscribe("bench.bare.ping", cb=bare_handler)
    client = await Bus.connect(url, name="bench", host="bench")
    subject = subjects.command("bench", "catalogue", "ping")
    ours, theirs = [], []
    for i in range(count):
        t = time.perf_counter()
        await client.request(subject, Ping(n=i), Ping)
        ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        reply = await client.nc.request("bench.bare.ping", payload, timeout=5)
        msgspec.json.decode(reply.data)
        theirs.append(time.perf_counter() - t)
    await client.close()
    await bare.close()
    await agent.drain()
    ms = 1000
    return [
        Result("bus request/reply", f"p50 of {count:,}", percentile(ours, 50) * ms,
               percentile(theirs, 50) * ms, "bare nats-py request", "ms", "within 1.3x"),
        Result("bus request/reply", f"p99 of {count:,}", percentile(ours, 99) * ms,
               percentile(theirs, 99) * ms, "bare nats-py request", "ms", "-"),
    ]


async def publish_rate(url: str, count: int) -> list[Result]:
    bus = await Bus.connect(url, name="bench", host="bench")
    await bus.ensure_stream()
    subject = subjects.event("bench", "catalogue", "agent.stopping")
    events = [(subject, AgentStopping(host="bench", agent="catalogue")) for _ in range(count)]
    t = time.perf_counter()
    stored = await bus.publish_events(events, timeout=60)
    ours = count / (time.perf_counter() - t)
    assert stored == count, f"only {stored} of {count} stored"
    payload = msgspec.json.encode(events[0][1])
    t = time.perf_counter()
    futures = [await bus.js.publish_async(subject, payload) for _ in range(count)]
    await asyncio.gather(*futures)
    theirs = count / (time.perf_counter() - t)
    await bus.close()
    return [Result("event publish (JetStream)", f"{count:,} events", ours, theirs,
                   "bare js.publish_async", "events/s", ">= 0.8x and >= 20,000/s",
                   higher_is_better=True)]


async def run(quick: bool = False) -> list[Result]:
    with tempfile.TemporaryDirectory() as tmp:
        server = NatsServer(Path(tmp) / "nats", port=-1)
        server.start()
        try:
            results = await request_latency(server.url, Path(tmp), 1000 if quick else 10_000)
            results += await publish_rate(server.url, 5000 if quick else 50_000)
        finally:
            server.stop()
    return results


if __name__ == "__main__":
    for r in asyncio.run(run("--quick" in sys.argv)):
        print(r.row())
