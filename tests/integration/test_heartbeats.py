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
from shared.messages import vm as vm_api
from shared.messages.catalogue import ImageCounts
from shared.messages.hardware import HostResources, SriovSet
from shared.messages.hosts import Heartbeat, HeartbeatDetails
from shared.messages.vm import AcceleratorDecision, VmCreate, VmRef, VmSpec
from shared.natsserver import NatsServer
from tests.support.agents import agent_config, agent_in_process
from tests.support.sysfs_tree import FIXTURES, TreeKernel, build
from tests.support.wait import until

pytestmark = pytest.mark.integration


@contextlib.asynccontextmanager
async def hw_agent(url: str, root: Path, host: str, fixture: str,
                   **overrides: Any) -> AsyncIterator[Agent]:
    tree = FIXTURES[fixture]()
    builder = build(root / host / "sys", tree)
    (root / host / "proc").mkdir()
    async with agent_in_process(
            "hardware", url, root / host / "state", host, sysfs_root=str(builder.root),
            extra={"root_dev": tree.root_dev, "proc_root": str(root / host / "proc")},
            **overrides) as agent:
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


async def test_the_host_watch_follows_kv_hosts_without_reading_it_again(
        nats_server: NatsServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """One consumer for the watch's life: beats of another host arrive as they are written,
    no consumer is created per beat, a lost consumer is made again before anyone looks down,
    and a host that stops beating is said down after the TTL."""
    caplog.set_level(logging.DEBUG, logger=hostwatch.log.name)
    ttl = 2.0
    bus = await Bus.connect(nats_server.url, name="test", host="h2", kv_ttl_s=ttl)
    created: list[str] = []
    downs: asyncio.Queue[Any] = asyncio.Queue()

    async def on_created(msg: Any) -> None:
        created.append(msg.subject.rsplit(".", 1)[-1])

    async def on_down(msg: Any) -> None:
        downs.put_nowait(event_decoder().decode(msg.data))

    beating = asyncio.Event()
    beating.set()
    started = time.time()

    async def beat_h2() -> None:  # another host's vm agent, as its KV record shows it
        kv = await bus.kv(subjects.KV_HOSTS)
        while beating.is_set():
            await kv.put(subjects.heartbeat_key("h2", "vm"), encode(Heartbeat(
                host="h2", agent="vm", version="1", started=started, time=time.time(),
                metrics_url="")))
            await asyncio.sleep(0.25)

    await bus.nc.subscribe(f"$JS.EVENT.ADVISORY.CONSUMER.CREATED.KV_{subjects.KV_HOSTS}.>",
                           cb=on_created)
    await bus.nc.subscribe(subjects.events_filter("h1", "hardware", "host.down.>"), cb=on_down)
    beater = asyncio.create_task(beat_h2())
    try:
        async with hw_agent(nats_server.url, tmp_path, "h1", "laptop",
                            heartbeat_ttl_s=ttl) as watcher:
            assert watcher.cfg.heartbeat_s == 0.5
            await until("h1's host watch to see h2", lambda: any(
                r.getMessage() == "h1 watches host h2 (agents ['vm'])"
                for r in caplog.records), timeout=10)
            kv = await bus.kv(subjects.KV_HOSTS)
            own = subjects.heartbeat_key("h1", "hardware")
            first = (await kv.get(own)).revision or 0
            before = len(created)
            # the old watch created a consumer per beat; h1 beats ~5 times in 2.5 s
            await asyncio.sleep(2.5)
            assert ((await kv.get(own)).revision or 0) >= first + 8  # h1's and h2's beats
            assert len(created) == before, f"consumers created while following: {created}"
            # the watch's consumer is lost (as in a server restart): made again, h2 stays up
            info = await bus.js.consumers_info(f"KV_{subjects.KV_HOSTS}")
            assert len(info) == 1, [c.name for c in info]
            await bus.js.delete_consumer(f"KV_{subjects.KV_HOSTS}", info[0].name)
            await until("a consumer made again", lambda: len(created) > before, timeout=10)
            await asyncio.sleep(ttl + 0.5)
            assert downs.empty(), "h2 looked down while its beats were not reaching h1"
            beating.clear()
            await beater
            down = await asyncio.wait_for(downs.get(), ttl + 10)
    finally:
        beating.clear()
        await beater
        await bus.close()
    assert isinstance(down, HostDown) and (down.host, down.down_host) == ("h1", "h2")
    assert down.event_id == f"host-down-h2-{int(started * 1000)}"
    assert down.reason in (f"no heartbeat for {ttl:.0f} s", "its agents removed their heartbeats")


async def test_the_vm_agent_beats_the_memory_promised_to_its_vms(
        nats_server: NatsServer, tmp_path: Path, libvirt_test_uri: str) -> None:
    """Defined VMs count, running or not: placement reads this figure, not every VM record."""
    async with agent_in_process(
            "vm", nats_server.url, tmp_path, "h1", libvirt_uri=libvirt_test_uri,
            accelerator="tcg", extra={"reconcile_s": 3600,
                                      "disk_dir": str(tmp_path / "disks")}) as agent:
        assert (await heartbeat(agent)).details.vm_memory_mib == 0
        for name, mib in (("a", 256), ("b", 128)):
            await agent.bus.call("h1", vm_api.CREATE, VmCreate(spec=VmSpec(
                name=name, memory_mib=mib, firmware="bios", display="none", nics=[])))
        await agent.bus.call("h1", vm_api.START, VmRef(vm="a"))

        async def promised() -> bool:
            return (await heartbeat(agent)).details.vm_memory_mib == 384

        await until("the heartbeat to count both VMs", promised, timeout=10)


async def test_three_leases_of_five_hosts_and_a_dead_watchers_lease_passes_on(
        nats_server: NatsServer) -> None:
    """Few watchers: of five hardware agents three hold the host watch's leases; one that
    restarts within the TTL takes its own slot back, a dead one's slot goes to a waiting
    agent within the TTL, and one that drains gives its slot up at once."""
    ttl = 2.0
    hosts = ("h1", "h2", "h3", "h4", "h5")
    buses = {h: await Bus.connect(nats_server.url, name=f"hardware@{h}", host=h, kv_ttl_s=ttl)
             for h in hosts}
    try:
        leases = {h: hostwatch.Lease(bus, h) for h, bus in buses.items()}
        held = [h for h in hosts if await leases[h].hold()]
        assert held == ["h1", "h2", "h3"]
        assert sorted(leases[h].slot or 0 for h in held) == [0, 1, 2]
        slot2 = leases["h2"].slot
        leases["h2"] = hostwatch.Lease(buses["h2"], "h2")  # restarted: its key is still there
        assert await leases["h2"].hold() and leases["h2"].slot == slot2
        dead = leases.pop("h1").slot  # h1 dies: nobody renews its slot

        async def passed_on() -> bool:
            for lease in leases.values():
                await lease.hold()
            return any(leases[h].slot == dead for h in ("h4", "h5"))

        await until("h1's lease to pass on", passed_on, timeout=5 * ttl, interval=0.2)
        assert leases["h2"].slot == slot2 and leases["h3"].slot is not None  # renewed
        waiting = next(h for h in ("h4", "h5") if leases[h].slot is None)
        assert not any([await leases[waiting].hold() for _ in range(3)])  # tries each slot
        await leases["h3"].release()  # drains: its slot is taken within three tries
        assert any([await leases[waiting].hold() for _ in range(3)])
    finally:
        for bus in buses.values():
            await bus.close()


async def test_a_hardware_agent_without_a_lease_does_not_watch_until_one_is_free(
        nats_server: NatsServer, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With one lease: the first agent watches (one consumer of KV hosts), the second does
    not, and takes the watch over when the first drains."""
    caplog.set_level(logging.DEBUG, logger=hostwatch.log.name)
    monkeypatch.setattr(hostwatch, "WATCHERS", 1)
    ttl = 2.0

    def said(text: str) -> bool:
        return any(r.getMessage() == text for r in caplog.records)

    first: contextlib.AbstractAsyncContextManager[Agent] | None = hw_agent(
        nats_server.url, tmp_path, "h1", "laptop", heartbeat_ttl_s=ttl)
    assert first is not None
    await first.__aenter__()
    try:
        await until("h1's host watch", lambda: said("h1 watches host h1 (agents ['hardware'])"),
                    timeout=10)
        async with hw_agent(nats_server.url, tmp_path, "h2", "laptop",
                            heartbeat_ttl_s=ttl) as second:
            await until("h1 to see h2", lambda: said("h1 watches host h2 (agents ['hardware'])"),
                        timeout=10)
            info = await second.bus.js.consumers_info(f"KV_{subjects.KV_HOSTS}")
            assert len(info) == 1, [c.name for c in info]  # h1's watch only
            assert not any(r.getMessage().startswith("h2 watches") for r in caplog.records)
            first, draining = None, first
            await draining.__aexit__(None, None, None)  # h1 drains: its lease is free at once
            await until("h2 to take the lease and watch",
                        lambda: said("h2 watches host h2 (agents ['hardware'])"), timeout=10)
            assert said("host watch: h2 holds lease 0 of 1")
    finally:
        if first is not None:
            await first.__aexit__(None, None, None)
