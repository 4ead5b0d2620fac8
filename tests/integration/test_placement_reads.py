"""``choose`` on a real nats-server reads KV ``hosts`` only while every vm agent's heartbeat
says what its VMs were promised; the VM records are read for a heartbeat without it; a
``Recent`` spreads a burst that the heartbeats cannot see yet."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from shared import subjects
from shared.bus import Bus
from shared.cluster import HeartbeatFollower
from shared.codec import encode
from shared.messages import vm as vm_api
from shared.messages.hardware import HostCaps, HostResources
from shared.messages.hosts import Heartbeat, HeartbeatDetails
from shared.messages.storage import PoolRoom
from shared.messages.vm import VmCreate, VmInfo, VmRecord, VmSpec
from shared.natsserver import NatsServer
from shared.placement import Recent, choose
from tests.support.web import bearer, gateway_in_process, make_token

pytestmark = pytest.mark.integration
GiB = 1 << 30


async def put_host(bus: Bus, host: str, *, promised: int | None, avail_gib: float) -> None:
    kv = await bus.kv(subjects.KV_HOSTS)
    parts = {
        "hardware": HeartbeatDetails(caps=HostCaps(arch="x86_64"), resources=HostResources(
            memory_total_bytes=16 * GiB, memory_available_bytes=int(avail_gib * GiB),
            uefi=True)),
        "storage": HeartbeatDetails(pools={"default": PoolRoom(path="/p", free_bytes=GiB << 6)}),
        "vm": HeartbeatDetails(vm_memory_mib=promised),
    }
    for agent, details in parts.items():
        await kv.put(subjects.heartbeat_key(host, agent), encode(Heartbeat(
            host=host, agent=agent, version="1", started=1.0, time=time.time(),
            metrics_url="", details=details)))


async def test_choose_reads_the_vm_records_only_for_a_heartbeat_without_the_figure(
        nats_server: NatsServer) -> None:
    bus = await Bus.connect(nats_server.url, name="test", host="t")
    vms_reads: list[str] = []

    async def on_created(msg: Any) -> None:
        vms_reads.append(msg.subject)

    try:
        await bus.nc.subscribe(f"$JS.EVENT.ADVISORY.CONSUMER.CREATED.KV_{subjects.KV_VMS}.>",
                               cb=on_created)
        vms = await bus.kv(subjects.KV_VMS)
        for i in range(3):  # records that would make a the fuller host: its heartbeat wins
            rec = VmRecord(spec=VmSpec(name=f"a{i}", memory_mib=4096), host="a")
            await vms.put(rec.spec.uuid or f"u{i}", encode(rec))
        await put_host(bus, "a", promised=0, avail_gib=8)
        await put_host(bus, "b", promised=10 * 1024, avail_gib=8)  # 6 GiB left of 16
        spec = VmSpec(name="x", memory_mib=1024)
        choice = await choose(bus, spec)
        assert choice.host == "a" and choice.reason.startswith("a: up, 7.0 GiB memory left")
        await bus.nc.flush()
        assert vms_reads == []
        # an agent from before the figure: b's records are read, and count
        await put_host(bus, "a", promised=None, avail_gib=8)
        await put_host(bus, "b", promised=0, avail_gib=7)
        choice = await choose(bus, spec)
        assert choice.host == "b", choice.passed_over  # a: 16 - 12 GiB = 4 GiB left
        await bus.nc.flush()
        assert len(vms_reads) == 1
        # a burst: what was placed counts until the host's beats catch up
        await put_host(bus, "a", promised=0, avail_gib=8)
        await put_host(bus, "b", promised=0, avail_gib=8)
        recent = Recent()
        hosts = [(await choose(bus, VmSpec(name=f"v{i}", memory_mib=512), recent=recent)).host
                 for i in range(6)]
        assert sorted(hosts) == ["a"] * 3 + ["b"] * 3
        # a caller that places many follows KV hosts: no read of it per choice
        follower = HeartbeatFollower(bus)
        await follower.start()
        assert follower.ready and len(follower.entries()) == 6
        reads: list[str] = []

        async def on_read(msg: Any) -> None:
            reads.append(msg.subject)

        await bus.nc.subscribe("$JS.EVENT.ADVISORY.CONSUMER.CREATED.>", cb=on_read)
        await put_host(bus, "b", promised=1024, avail_gib=8)
        assert await follower.poll() >= 3  # b's three agents' beats, in one batch
        assert any(hb.details.vm_memory_mib == 1024 for _k, _r, hb in follower.entries())
        choice = await choose(bus, spec, follower=follower)
        assert choice.host == "a"
        assert choice.passed_over == {"b": "fits, with less memory left than a"}
        await bus.nc.flush()
        assert reads == []
        await follower.stop()
    finally:
        await bus.close()


async def test_the_web_gateway_spreads_a_burst_of_host_auto_creates(
        nats_server: NatsServer) -> None:
    """``POST /api/v1/vms`` with ``"host": "auto"`` keeps the gateway's ``Recent``: six VMs
    created in a row, before any heartbeat could count them, go three to each host (without
    it, all six would go to the host whose beat said the most)."""
    bus = await Bus.connect(nats_server.url, name="test", host="t")
    agents: list[Bus] = []
    created: list[str] = []

    def vm_agent(host: str) -> Any:
        async def create(req: VmCreate) -> VmInfo:
            created.append(host)
            return VmInfo(name=req.spec.name, uuid=f"u-{req.spec.name}", host=host,
                          state="shutoff", accelerator="tcg", vcpus=1,
                          memory_mib=req.spec.memory_mib, spec=req.spec)
        return create

    try:
        await bus.ensure_stream()
        await put_host(bus, "a", promised=0, avail_gib=8)
        await put_host(bus, "b", promised=0, avail_gib=7.9)  # a looks freer at every choice
        for host in ("a", "b"):
            agent = await Bus.connect(nats_server.url, name=f"vm@{host}", host=host)
            agents.append(agent)
            await agent.serve("vm", "0.0.0", [(vm_api.CREATE, vm_agent(host))],
                              metadata={"host": host})
        async with gateway_in_process(nats_server.url, "a") as gw, httpx.AsyncClient(
                base_url=gw.url) as http:
            token = await make_token(gw.bus, "op", "operator")
            for i in range(6):
                r = await http.post("/api/v1/vms", headers=bearer(token), json={
                    "host": "auto", "spec": {"name": f"v{i}", "memory_mib": 512}})
                assert r.status_code == 201, r.text
        assert sorted(created) == ["a"] * 3 + ["b"] * 3
    finally:
        for agent in agents:
            await agent.close()
        await bus.close()
