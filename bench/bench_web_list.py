"""``GET /api/v1/vms`` of the web gateway with 1,000 VMs on three hosts, beside the same
query over the bus (``cluster_vms``, what ``phyllome vm list --all`` reads), same server,
same run; p50 of many rounds. The goal: HTTP costs at most 1.5 times the bus.

    python -m bench.bench_web_list [--quick]
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx

from bench.bench_cluster_list import fill
from bench.common import Result, percentile
from services.web.config import load
from services.web.service import WebGateway
from shared import tokens
from shared.bus import Bus
from shared.cluster import cluster_vms
from shared.natsserver import NatsServer


async def p50(rounds: int, fn: Callable[[], Awaitable[object]]) -> float:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        await fn()
        times.append(time.perf_counter() - t)
    return percentile(times, 50)


async def run(quick: bool = False) -> list[Result]:
    count = 1000
    with tempfile.TemporaryDirectory() as tmp:
        server = NatsServer(Path(tmp) / "nats", port=-1)
        server.start()
        try:
            bus = await Bus.connect(server.url, name="bench", host="a", give_up_after=5)
            gateway = WebGateway(load({"PHYLLOME_HOST": "a", "PHYLLOME_NATS_URL": server.url,
                                       "PHYLLOME_WEB_LISTEN": "127.0.0.1:0"}))
            try:
                await fill(bus, count)
                await gateway.start()
                token, _ = await tokens.create(bus, "bench", "viewer")
                async with httpx.AsyncClient(base_url=gateway.url, headers={
                        "authorization": f"Bearer {token}"}) as http:

                    async def over_http() -> None:
                        r = await http.get("/api/v1/vms")
                        assert len(r.json()["vms"]) == count

                    async def over_bus() -> None:
                        assert len(await cluster_vms(bus)) == count

                    await over_http()
                    rounds = 5 if quick else 30
                    ours = await p50(rounds, over_http)
                    theirs = await p50(rounds, over_bus)
            finally:
                await gateway.close()
                await bus.close()
        finally:
            server.stop()
    return [Result("web: GET /api/v1/vms", f"{count:,} VMs, 3 hosts, p50", ours * 1000,
                   theirs * 1000, "cluster_vms over the bus", "ms", "≥ 0.67x (≤ 1.5x the bus)",
                   note="client and gateway in one process; JSON decoded by the client")]


if __name__ == "__main__":
    for r in asyncio.run(run("--quick" in sys.argv)):
        print(r.row())
