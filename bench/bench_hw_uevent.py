"""Device changes to bus events: how long a uevent takes to become a ``device.changed`` event
a subscriber holds, in the hardware agent on a real nats-server.

Two paths: the agent's own (a uevent handed to it, on the intel-desktop fixture tree:
inventory update, verdicts, publish, delivery), and the whole path on this machine's /sys
(root only: ``change`` written into a real device's ``uevent``, the kernel's netlink message,
pyudev, the agent). The tests keep only generous bounds on these; the figures are here.

    python -m bench.bench_hw_uevent [--quick]
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench.common import Result, percentile
from shared import subjects
from shared.contracts import event_decoder
from shared.messages.hardware import DeviceChanged
from shared.natsserver import NatsServer
from tests.support.agents import agent_in_process
from tests.support.sysfs_tree import TreeKernel, build, intel_desktop


async def latencies(agent: Any, address: str, count: int,
                    cause: Callable[[], Awaitable[None]]) -> list[float]:
    """Seconds from ``cause()`` to the ``device.changed`` event of ``address``, ``count``
    times."""
    got: asyncio.Queue[tuple[float, Any]] = asyncio.Queue()

    async def on(msg: Any) -> None:
        got.put_nowait((time.perf_counter(), event_decoder().decode(msg.data)))

    sub = await agent.bus.nc.subscribe(subjects.event("bench", "hardware", "device.changed"),
                                       cb=on)
    await agent.bus.nc.flush()
    out = []
    for _ in range(count):
        started = time.perf_counter()
        await cause()
        while True:
            at, ev = await asyncio.wait_for(got.get(), 10)
            if isinstance(ev, DeviceChanged) and ev.device.address == address:
                break
        out.append(at - started)
    await sub.unsubscribe()
    return out


async def fixture_path(url: str, tmp: Path, count: int) -> list[float]:
    builder = build(tmp / "sys", intel_desktop())
    async with agent_in_process("hardware", url, tmp / "state", "bench",
                                sysfs_root=str(builder.root)) as agent:
        agent.handlers.fs.after_write = TreeKernel(builder)
        return await latencies(agent, "0000:01:00.1", count,
                               lambda: agent.handlers.device_event("change", "0000:01:00.1"))


async def kernel_path(url: str, tmp: Path, count: int) -> list[float] | None:
    """None where this process may not write uevents or /sys has no PCI device."""
    pci = Path("/sys/bus/pci/devices")
    if os.geteuid() != 0 or not pci.is_dir() or not any(pci.iterdir()):
        return None
    address = sorted(os.listdir(pci))[-1]
    async with agent_in_process("hardware", url, tmp / "state-sys", "bench",
                                sysfs_root="/sys") as agent:
        if agent.handlers.monitor is None:
            return None

        async def change() -> None:
            (pci / address / "uevent").write_text("change")

        return await latencies(agent, address, count, change)


async def run(quick: bool = False) -> list[Result]:
    count = 50 if quick else 500
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        server = NatsServer(tmp / "nats", port=-1)
        server.start()
        try:
            agent_times = await fixture_path(server.url, tmp, count)
            kernel_times = await kernel_path(server.url, tmp, 20 if quick else 100)
        finally:
            server.stop()
    ms = 1000
    rows = [Result("hw uevent to bus event", f"agent path, fixture tree, median of {count}",
                   statistics.median(agent_times) * ms, 5.0, "target", "ms", "< 5 ms",
                   note=f"p99 {percentile(agent_times, 99) * ms:.1f} ms")]
    if kernel_times is not None:
        rows.append(Result(
            "hw uevent to bus event", f"kernel uevent on /sys, median of {len(kernel_times)}",
            statistics.median(kernel_times) * ms, 100.0, "target", "ms", "< 100 ms",
            note=f"p99 {percentile(kernel_times, 99) * ms:.1f} ms; netlink, pyudev, agent"))
    return rows


def main() -> None:
    import sys

    for r in asyncio.run(run("--quick" in sys.argv)):
        print(r.row())


if __name__ == "__main__":
    main()
