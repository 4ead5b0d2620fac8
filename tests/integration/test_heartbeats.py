"""What agents tell the cluster in their heartbeats, on a real nats-server: what each one
measures before every beat (``Agent.on_beat``: the hardware agent's resources over fixture
trees, the storage agent's pool room), and the hardware agent's host watch that says when
another host's agents are gone."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from services.hardware import hostwatch
from shared import subjects
from shared.agent import Agent
from shared.bus import Bus
from shared.codec import encode
from shared.contracts import event_decoder
from shared.messages import Empty, HostDown
from shared.messages import hardware as hardware_api
from shared.messages import storage as storage_api
from shared.messages.catalogue import ImageCounts
from shared.messages.hardware import HostResources, SriovSet
from shared.messages.hosts import Heartbeat, HeartbeatDetails
from shared.messages.vm import AcceleratorDecision
from shared.natsserver import NatsServer
from tests.support.agents import agent_config, agent_in_process
from tests.support.sysfs_tree import FIXTURES, TreeKernel, build
from tests.support.wait import until

pytestmark = pytest.mark.integration


@contextlib.asynccontextmanager
async def hw_agent(url: str, root: Path, host: str, fixture: str) -> AsyncIterator[Agent]:
    tree = FIXTURES[fixture]()
    builder = build(root / host / "sys", tree)
    (root / host / "proc").mkdir()
    async with agent_in_process(
            "hardware", url, root / host / "state", host, sysfs_root=str(builder.root),
            extra={"root_dev": tree.root_dev, "proc_root": str(root / host / "proc")}) as agent:
        agent.handlers.fs.after_write = TreeKernel(builder)  # the kernel's part on a tree
        yield agent


async def heartbeat(agent: Agent) -> Heartbeat:
    """The agent's record in KV ``hosts``, as any reader sees it."""
    kv = await agent.bus.kv(subjects.KV_HOSTS)
    entry = await kv.get(subjects.heartbeat_key(agent.host, agent.name))
    return msgspec.json.decode(entry.value or b"", type=Heartbeat)


async def resources(agent: Agent) -> HostResources | None:
    return (await heartbeat(agent)).details.resources


async def test_a_measure_that_fails_does_not_stop_the_beat(
        nats_server: NatsServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    agent = Agent("catalogue", agent_config("catalogue", nats_server.url, tmp_path, "h1"))
    beats = 0

    async def broken() -> None:
        raise RuntimeError("a bug in a measure")

    async def count() -> None:
        nonlocal beats
        beats += 1
        agent.details = msgspec.structs.replace(agent.details, images=ImageCounts(listed=beats))

    async def setup(a: Agent) -> object:
        a.on_beat(broken)
        a.on_beat(count)
        return object()

    try:
        await agent.start(setup, [])
        first = (await heartbeat(agent)).details.images
        assert first == ImageCounts(listed=1)  # measured for the first beat already

        async def beat_again() -> bool:
            images = (await heartbeat(agent)).details.images
            return images is not None and images.listed > 1

        await until("a later beat with a fresh measure", beat_again, timeout=10)
    finally:
        await agent.drain()
    assert any("heartbeat details not refreshed" in r.getMessage()
               and "a bug in a measure" in r.getMessage() for r in caplog.records)


async def test_the_storage_agent_beats_its_pools_room(nats_server: NatsServer,
                                                      tmp_path: Path) -> None:
    async with agent_in_process("storage", nats_server.url, tmp_path, "h1") as agent:
        pools = (await agent.bus.call("h1", storage_api.POOLS, Empty())).pools
        rooms = (await heartbeat(agent)).details.pools
        assert {n: (r.path, r.reflink) for n, r in rooms.items()} == {
            p.name: (p.path, p.reflink) for p in pools}
        assert all(r.free_bytes > 0 for r in rooms.values())


async def test_the_heartbeat_carries_what_vms_can_be_given(nats_server: NatsServer,
                                                           tmp_path: Path) -> None:
    async with hw_agent(nats_server.url, tmp_path, "h1", "sriov-nic") as nic, \
            hw_agent(nats_server.url, tmp_path, "h2", "intel-gvtg") as gvt:
        res = await resources(nic)  # the first beat, written before the agent said it started
        assert res is not None and res.cpus >= 1 and res.memory_total_bytes > 0
        assert {d.address: d.physfn for d in res.devices if d.physfn} == {
            "0000:03:10.0": "0000:03:00.0", "0000:03:10.2": "0000:03:00.0"}
        ports = {d.address: d.companions for d in res.devices if d.kind == "net"
                 and not d.physfn}
        assert ports == {"0000:03:00.0": ["0000:03:00.1"], "0000:03:00.1": ["0000:03:00.0"],
                         "0000:05:00.0": []}  # not the root disk's controller
        await nic.bus.call("h1", hardware_api.SRIOV_SET,
                           SriovSet(address="0000:03:00.0", num_vfs=3))

        async def three_vfs() -> bool:  # measured again before a later beat
            now = await resources(nic)
            return now is not None and sum(bool(d.physfn) for d in now.devices) == 3

        await until("the heartbeat to show the 3 VFs", three_vfs, timeout=10)
        res = await resources(gvt)
        assert res is not None and res.devices == []  # its only GPU drives the host's console
        assert [(m.mdev_type, m.available, m.instances) for m in res.mdevs] == [
            ("i915-GVTg_V5_4", 1, ["9f5c1a2e-5f7b-4c1e-8a5b-3a4f1e2d3c4b"]),
            ("i915-GVTg_V5_8", 2, [])]


async def test_the_hardware_agent_says_when_another_host_is_gone(
        nats_server: NatsServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=hostwatch.log.name)
    queue: asyncio.Queue[Any] = asyncio.Queue()
    async with hw_agent(nats_server.url, tmp_path, "h1", "intel-desktop") as watcher:

        async def on(msg: Any) -> None:
            queue.put_nowait(event_decoder().decode(msg.data))

        sub = await watcher.bus.nc.subscribe(
            subjects.events_filter("h1", "hardware", "host.down.>"), cb=on)
        async with hw_agent(nats_server.url, tmp_path, "h2", "laptop") as other:
            started = other.started
            await until("h1's host watch to see h2", lambda: any(
                r.getMessage() == "h1 watches host h2 (agents ['hardware'])"
                for r in caplog.records), timeout=10)
        down = await asyncio.wait_for(queue.get(), 10)  # h2 drained: its keys are gone
        await sub.unsubscribe()
    assert isinstance(down, HostDown) and (down.host, down.down_host) == ("h1", "h2")
    assert down.reason == "its agents removed their heartbeats"
    assert down.event_id == f"host-down-h2-{int(started * 1000)}"



@pytest.mark.parametrize(("usable", "probe"), [(True, "passed"), (False, "failed"),
                                               (None, "not-run")])
async def test_a_hardware_agent_started_late_reads_the_vm_agents_verdict(
        nats_server: NatsServer, tmp_path: Path, usable: bool | None, probe: str) -> None:
    """The vm agent's boot probe ran before this hardware agent started: its heartbeat has it."""
    vm_beat = Heartbeat(host="h1", agent="vm", version="1", started=1.0, time=time.time(),
                        metrics_url="", details=HeartbeatDetails(accelerator=AcceleratorDecision(
                            policy="auto", accelerator="kvm" if usable else "tcg",
                            kvm_usable=usable)))
    bus = await Bus.connect(nats_server.url, name="test", host="h1")
    try:
        kv = await bus.kv(subjects.KV_HOSTS)
        await kv.put(subjects.heartbeat_key("h1", "vm"), encode(vm_beat))
    finally:
        await bus.close()
    async with hw_agent(nats_server.url, tmp_path, "h1", "laptop") as agent:
        caps = (await heartbeat(agent)).details.caps
        assert caps is not None and caps.kvm_boot_probe == probe
