"""The cluster's VM list from KV ``vms``: ``cluster_vms`` (one ordered consumer, last value per
key) vs what a nats-py user writes (``kv.keys()`` then ``kv.get()`` per key), 1,000 VMs on
three hosts, same server, same run.

    python -m bench.bench_cluster_list [--quick]
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from bench.common import Result
from shared import subjects
from shared.bus import Bus
from shared.cluster import cluster_vms
from shared.codec import encode
from shared.messages.hosts import Heartbeat
from shared.messages.vm import VmRecord, VmSpec
from shared.natsserver import NatsServer


async def fill(bus: Bus, count: int) -> None:
    vms, hosts = await bus.kv(subjects.KV_VMS), await bus.kv(subjects.KV_HOSTS)
    for h in ("a", "b", "c"):
        await hosts.put(subjects.heartbeat_key(h, "vm"), encode(Heartbeat(
            host=h, agent="vm", version="1", started=time.time(), time=time.time(),
            metrics_url="")))
    for i in range(count):
        host = "abc"[i % 3]
        spec = VmSpec(name=f"vm-{i:04d}", uuid=f"00000000-0000-0000-0000-{i:012d}")
        await vms.put(spec.uuid, encode(VmRecord(spec=spec, host=host)))


async def naive(bus: Bus) -> int:
    kv = await bus.js.key_value(subjects.KV_VMS)
    n = 0
    for key in await kv.keys():
        entry = await kv.get(key)
        if entry.value:
            n += 1
    return n


async def best_of(rounds: int, fn: Callable[[], Awaitable[object]]) -> float:
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        await fn()
        best = min(best, time.perf_counter() - t)
    return best


async def run(quick: bool = False) -> list[Result]:
    count = 1000
    with tempfile.TemporaryDirectory() as tmp:
        server = NatsServer(Path(tmp) / "nats", port=-1)
        server.start()
        try:
            bus = await Bus.connect(server.url, name="bench", host="a", give_up_after=5)
            try:
                await fill(bus, count)
                assert len(await cluster_vms(bus)) == count and await naive(bus) == count
                rounds = 3 if quick else 10
                ours = await best_of(rounds, lambda: cluster_vms(bus))
                theirs = await best_of(rounds, lambda: naive(bus))
            finally:
                await bus.close()
        finally:
            server.stop()
    return [Result("cluster VM list from KV", f"{count:,} VMs, 3 hosts", ours * 1000,
                   theirs * 1000, "kv.keys() + kv.get() per key", "ms", "< 1,000 ms",
                   note="best of rounds; host liveness included in ours")]


if __name__ == "__main__":
    for r in asyncio.run(run("--quick" in sys.argv)):
        print(r.row())
