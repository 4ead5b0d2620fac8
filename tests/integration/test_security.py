"""Least-privilege identities against a real nats-server with TLS: each tries what it must
not do and is refused; each can do its job."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import ssl
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgspec
import nats
import nats.errors
import nats.js.errors
import pytest

from shared import contracts, security, subjects
from shared.agent import Agent
from shared.bus import Bus
from shared.errors import Forbidden, Unavailable
from shared.messages import AgentStopping, Empty, EndpointSpec
from shared.messages import hardware as hardware_api
from shared.messages import storage as storage_api
from shared.messages import vm as vm_api
from shared.messages.hardware import BindRequest, BootProbe, DeviceRef
from shared.messages.hosts import Heartbeat
from shared.messages.jobs import JobRef
from shared.messages.vm import VmClone, VmCreate, VmDelete, VmRef, VmSpec
from shared.natsserver import NatsServer
from tests.support.agents import REPO, agent_in_process
from tests.support.sysfs_tree import FIXTURES, build
from tests.support.wait import until


@pytest.fixture
def secure(tmp_path: Path) -> Iterator[tuple[NatsServer, Path, dict[str, str]]]:
    d = tmp_path / "secure"
    users = security.generate(d, ["h1", "h2"])
    server = NatsServer(tmp_path / "nats", port=-1, extra_conf=security.server_conf(d))
    server.start()
    yield server, d, users
    server.stop()


class Conn:
    """A client of one identity that records the server's permission errors."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.nc: nats.NATS | None = None

    async def open(self, url: str, user: str, password: str, ca: Path) -> Conn:
        async def on_error(e: Exception) -> None:
            self.errors.append(str(e))

        ctx = ssl.create_default_context(cafile=str(ca))
        self.nc = await nats.connect(url, user=user, password=password, tls=ctx,
                                     error_cb=on_error, allow_reconnect=False)
        return self

    async def wait_error(self, text: str, timeout: float = 5.0) -> None:
        await until(f"the server to say '{text}' (so far: {self.errors})",
                    lambda: any(text in e.lower() for e in self.errors), timeout, 0.02)


@pytest.fixture
async def connect(secure) -> AsyncIterator:  # type: ignore[no-untyped-def]
    server, d, users = secure
    opened: list[Conn] = []

    async def open_as(user: str) -> Conn:
        conn = await Conn().open(server.url, user, users[user], d / "ca.pem")
        opened.append(conn)
        return conn

    yield open_as
    for c in opened:
        if c.nc is not None and not c.nc.is_closed:
            await c.nc.close()


def as_identity(d: Path, user: str) -> dict[str, str]:
    """agent_in_process overrides that run an agent as ``user``."""
    env = security.read_env(d / f"{user}.env")
    return {"nats_user": env["PHYLLOME_NATS_USER"], "nats_password": env["PHYLLOME_NATS_PASSWORD"],
            "nats_ca": env["PHYLLOME_NATS_CA"]}


async def connect_bus(server: NatsServer, d: Path, user: str) -> Bus:
    env = security.read_env(d / f"{user}.env")
    return await Bus.connect(server.url, name=user, host="h1", user=user,
                             password=env["PHYLLOME_NATS_PASSWORD"],
                             ca=env["PHYLLOME_NATS_CA"], give_up_after=5)


async def set_up_streams(server: NatsServer, d: Path) -> None:
    """What `phyllome up --secure` does as admin before the agents start."""
    admin = await connect_bus(server, d, "admin")
    await admin.ensure_stream()
    for bucket in subjects.KV_BUCKETS:
        await admin.kv(bucket)
    await admin.close()


@contextlib.asynccontextmanager
async def hardware_agent(server: NatsServer, d: Path, tmp_path: Path) -> AsyncIterator[Agent]:
    """h1's hardware agent on a fixture sysfs tree, as h1-hardware."""
    await set_up_streams(server, d)
    tree = build(tmp_path / "sys", FIXTURES["intel-desktop"]())
    (tmp_path / "proc").mkdir()
    async with agent_in_process("hardware", server.url, tmp_path / "hw", "h1",
                                sysfs_root=str(tree.root),
                                extra={"proc_root": str(tmp_path / "proc")},
                                **as_identity(d, "h1-hardware")) as agent:
        yield agent


async def test_anonymous_and_plaintext_are_refused(secure) -> None:  # type: ignore[no-untyped-def]
    server, d, users = secure
    with pytest.raises((nats.errors.Error, OSError)):
        await nats.connect(server.url, allow_reconnect=False, connect_timeout=2)
    with pytest.raises((nats.errors.Error, OSError)):
        ctx = ssl.create_default_context(cafile=str(d / "ca.pem"))
        await nats.connect(server.url, tls=ctx, allow_reconnect=False, connect_timeout=2)
    with pytest.raises((nats.errors.Error, OSError)):
        ctx = ssl.create_default_context(cafile=str(d / "ca.pem"))
        await nats.connect(server.url, tls=ctx, user="h1-vm", password="wrong",
                           allow_reconnect=False, connect_timeout=2)
    with pytest.raises(Unavailable, match="cannot connect to NATS"):  # what the CLI reports
        await Bus.connect(server.url, name="cli", host="h1", user="operator", password="wrong",
                          ca=str(d / "ca.pem"), give_up_after=3)


async def test_admin_sets_up_then_agents_run_with_their_own_identity(
        secure, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server, d, _users = secure
    await set_up_streams(server, d)
    admin = await connect_bus(server, d, "admin")
    async with agent_in_process("storage", server.url, tmp_path / "st", "h1",
                                **as_identity(d, "h1-storage")) as agent:
        operator = await connect_bus(server, d, "operator")
        pools = await operator.call("h1", storage_api.POOLS, Empty(), idempotency_key="p1")
        assert pools.pools, "the storage agent answered its own command as h1-storage"
        kept = await (await admin.kv(subjects.KV_IDEMPOTENCY)).get(
            subjects.idempotency_key("h1", "storage", "pools", "p1"))
        assert kept.value and b"request_sha256" in kept.value, "the reply was kept in KV"
        beats = await operator.kv_values(subjects.KV_HOSTS, Heartbeat)
        assert [(b.host, b.agent) for b in beats] == [("h1", "storage")]
        started = [s async for s, _t, _d in operator.events("phy.evt.h1.storage.agent.started")]
        assert started, "the agent's own event was stored"
        assert agent.metrics.events_failed._value.get() == 0
        await operator.close()
    await admin.close()


async def test_agent_cannot_publish_another_agents_event_or_serve_its_subjects(
        connect) -> None:  # type: ignore[no-untyped-def]
    storage = await connect("h1-storage")
    monitor = await connect("monitor")
    seen: list[str] = []

    async def record(msg: nats.aio.msg.Msg) -> None:
        seen.append(msg.subject)

    await monitor.nc.subscribe("phy.evt.>", cb=record)
    await monitor.nc.flush()
    event = msgspec.json.encode(AgentStopping(host="h1", agent="vm"))
    await storage.nc.publish("phy.evt.h1.vm.state.x", event)
    await storage.wait_error("permissions violation for publish")
    storage.errors.clear()
    await storage.nc.publish("phy.evt.h2.storage.volume", event)  # another host's storage
    await storage.wait_error("permissions violation for publish")
    storage.errors.clear()
    await storage.nc.subscribe("phy.h1.vm.start")
    await storage.wait_error("permissions violation for subscription")
    storage.errors.clear()
    await storage.nc.publish(f"$KV.{subjects.KV_HOSTS}.h1.vm", b"{}")  # another's heartbeat
    await storage.wait_error("permissions violation for publish")
    storage.errors.clear()
    await storage.nc.publish(f"$KV.{subjects.KV_IMAGES}.evil", b"{}")
    await storage.wait_error("permissions violation for publish")
    storage.errors.clear()
    await storage.nc.publish(f"$KV.{subjects.KV_IDEMPOTENCY}.h1.vm.create.x", b"{}")  # vm's
    await storage.wait_error("permissions violation for publish")
    await storage.nc.publish("phy.evt.h1.storage.volume", event)  # its own: allowed
    await storage.nc.flush()
    await until("the storage agent's own event", lambda: "phy.evt.h1.storage.volume" in seen,
                timeout=5, interval=0.02)
    assert seen == ["phy.evt.h1.storage.volume"]


async def test_kv_an_agent_has_no_business_with_is_refused(connect) -> None:  # type: ignore[no-untyped-def]
    hw = await connect("h1-hardware")
    js = hw.nc.jetstream(timeout=2)
    with pytest.raises(Exception):  # noqa: B017 - a timeout or a permission error
        kv = await js.key_value(subjects.KV_IMAGES)
        await kv.get("anything")
    await hw.wait_error("permissions violation for publish")


async def test_operator_requests_but_cannot_publish_events_or_write_kv(connect) -> None:  # type: ignore[no-untyped-def]
    op = await connect("operator")
    await op.nc.publish("phy.evt.h1.vm.state.x", b"{}")
    await op.wait_error("permissions violation for publish")
    op.errors.clear()
    await op.nc.publish(f"$KV.{subjects.KV_VMS}.x", b"{}")
    await op.wait_error("permissions violation for publish")
    op.errors.clear()
    with pytest.raises(nats.errors.NoRespondersError):
        await op.nc.request("phy.h1.vm.list", b"", timeout=2)  # allowed, nobody serves it
    await op.nc.subscribe("phy.evt.>")
    await op.wait_error("permissions violation for subscription")


async def test_monitor_may_only_read(connect) -> None:  # type: ignore[no-untyped-def]
    mon = await connect("monitor")
    await mon.nc.publish("phy.h1.vm.delete", b"{}")
    await mon.wait_error("permissions violation for publish")
    mon.errors.clear()
    await mon.nc.publish("phy.evt.h1.vm.state.x", b"{}")
    await mon.wait_error("permissions violation for publish")


def test_roles_are_what_the_docs_say() -> None:
    p = security.permissions("vm", "h1")
    assert p["subscribe"]["allow"][0] == "phy.h1.vm.*"
    assert "phy.evt.h1.vm.>" in p["publish"]["allow"]
    assert not any(s.startswith("phy.evt.h1.storage") for s in p["publish"]["allow"])
    with pytest.raises(ValueError):
        security.permissions("root")
    with pytest.raises(Exception, match="is not valid"):
        security.permissions("vm", "bad.host")


# -- peer calls: each agent may call what PEER_CALLS names, and nothing else -----------------

def every_command(hosts: tuple[str, ...] = ("h1", "h2")) -> set[str]:
    """Every request subject of every agent on these hosts, the transfer chunks included."""
    verbs = {(svc, s.verb) for svc in subjects.SERVICES for s in contracts.endpoints(svc)}
    verbs |= {v for raw in security.PEER_SUBJECTS.values() for v in raw}
    return {subjects.command(h, svc, verb) for h in hosts for svc, verb in verbs}


def granted(agent: str, host: str, hosts: tuple[str, ...] = ("h1", "h2")) -> set[str]:
    """The request subjects PEER_CALLS grants ``agent`` of ``host``, spelled out per host."""
    out = set()
    for reach, specs in security.PEER_CALLS[agent].items():
        for s in specs:
            out |= {subjects.command(h, s.service, s.verb)
                    for h in ((host,) if reach == "own" else hosts)}
    return out | {subjects.command(h, svc, verb) for h in hosts
                  for svc, verb in security.PEER_SUBJECTS.get(agent, ())}


async def refused(conn: Conn, denied: set[str]) -> None:
    """Publish to each subject; the server must call each one a permission violation."""
    for subject in sorted(denied):
        await conn.nc.publish(subject, b"{}")
    await conn.nc.flush()

    def missing() -> list[str]:
        return [s for s in sorted(denied) if not any(f'"{s}"' in e for e in conn.errors)]

    await until(f"the server to refuse {len(denied)} subjects", lambda: not missing(),
                timeout=10, interval=0.05)


@pytest.mark.parametrize("agent", subjects.SERVICES)
async def test_an_agent_may_call_exactly_the_peer_endpoints_of_its_table(
        connect, agent: str) -> None:  # type: ignore[no-untyped-def]
    """Allowed: a request reaches the server's routing (nobody serves it here: no
    responders). Refused: every other verb of every agent on both hosts."""
    conn = await connect(f"h1-{agent}")
    allowed = granted(agent, "h1")
    assert (agent in ("hardware", "catalogue")) == (not allowed)
    for subject in sorted(allowed):
        with pytest.raises(nats.errors.NoRespondersError):
            await conn.nc.request(subject, b"{}", timeout=5)
    assert conn.errors == []
    await refused(conn, every_command() - allowed)


async def test_storage_identity_cannot_import_vm_state_or_bind_devices(
        secure, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """With the hardware agent serving: the storage identity's bind and boot-probe requests
    are refused by the server and fail at once, naming the identity; the hardware agent
    never sees them."""
    server, d, _users = secure
    async with hardware_agent(server, d, tmp_path):
        storage = await connect_bus(server, d, "h1-storage")
        calls: list[tuple[EndpointSpec[Any, Any], Any]] = [
            (hardware_api.BIND, BindRequest(address="0000:01:00.0")),
            (hardware_api.BOOT_PROBE, BootProbe(result="passed")),
            (vm_api.IMPORT_STATE, VmRef(vm="x"))]
        for spec, req in calls:
            with pytest.raises(Forbidden, match="not allowed for identity h1-storage"):
                await storage.call("h1", spec, req, timeout=30)  # refused long before
        operator = await connect_bus(server, d, "operator")
        caps = await operator.call("h1", hardware_api.CAPS, Empty())
        assert caps.kvm_boot_probe == "not-run"
        devices = await operator.call("h1", hardware_api.DEVICE, DeviceRef(
            address="0000:01:00.0"))
        assert devices.driver != "vfio-pci", "a refused bind changed nothing"
        await storage.close()
        await operator.close()


async def test_only_the_hosts_vm_agent_may_report_the_boot_probe(
        secure, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The boot probe marks KVM usable: the operator, the storage agent and another host's
    vm agent are refused; h1's vm agent is heard."""
    server, d, _users = secure
    async with hardware_agent(server, d, tmp_path):
        for user in ("operator", "h1-storage", "h2-vm"):
            bus = await connect_bus(server, d, user)
            with pytest.raises(Forbidden, match=f"not allowed for identity {user}"):
                await bus.call("h1", hardware_api.BOOT_PROBE, BootProbe(result="passed"),
                               timeout=30)
            await bus.close()
        vm = await connect_bus(server, d, "h1-vm")
        before = await vm.call("h1", hardware_api.CAPS, Empty())
        assert (before.kvm_boot_probe, before.kvm_usable) == ("not-run", False)
        caps = await vm.call("h1", hardware_api.BOOT_PROBE, BootProbe(result="passed"))
        assert (caps.kvm_boot_probe, caps.kvm_usable) == ("passed", True)
        await vm.close()


async def test_a_hardware_identity_takes_a_host_watch_lease_and_no_other_may(
        secure, connect, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Any hardware agent may take any of the host watch's leases (whoever holds one
    watches); the other agents, the operator and the monitor may not write them."""
    server, d, _users = secure
    async with hardware_agent(server, d, tmp_path) as agent:
        admin = await connect_bus(server, d, "admin")
        kv = await admin.kv(subjects.KV_WATCHERS)

        async def holds() -> bool:
            try:
                return (await kv.get("0")).value == b"h1"
            except nats.js.errors.KeyNotFoundError:
                return False

        await until("h1's hardware agent to hold lease 0", holds,
                    timeout=4 * agent.cfg.heartbeat_s + 10)
        await admin.close()
    for user in ("h1-storage", "h1-vm", "operator", "monitor"):
        conn = await connect(user)
        await conn.nc.publish(f"$KV.{subjects.KV_WATCHERS}.1", b"h1")
        await conn.wait_error("permissions violation for publish")


async def test_vm_agent_does_its_work_through_peers_as_itself(
        secure, tmp_path: Path, libvirt_test_uri: str) -> None:  # type: ignore[no-untyped-def]
    """The operator creates a VM from an image and clones it: the vm agent asks the
    catalogue and storage agents (image info, import, jobs, clone, volume info, delete),
    every agent under its own identity."""
    server, d, _users = secure
    await set_up_streams(server, d)
    tiny = tmp_path / "builtin" / "phyllome-tiny"
    tiny.mkdir(parents=True)
    with open(tiny / "disk.raw", "wb") as f:
        f.write(b"\xebphyllome-tiny")
        f.truncate(1 << 20)
    digest = hashlib.sha256((tiny / "disk.raw").read_bytes()).hexdigest()
    (tiny / "manifest.json").write_text(json.dumps({"files": {"disk.raw": {
        "sha256": digest, "size": 1 << 20}}}))
    pool_dir = tmp_path / "catalogue" / "pool"
    vm_extra: dict[str, Any] = {"reconcile_s": 3600, "disk_dir": str(tmp_path / "disks")}
    async with agent_in_process(
            "catalogue", server.url, tmp_path / "catalogue", "h1",
            extra={"osinfo_dir": "", "probe_interval_s": 0, "builtin_dir": str(tiny.parent),
                   "pool_dir": str(pool_dir)}, **as_identity(d, "h1-catalogue")), \
            agent_in_process("storage", server.url, tmp_path / "storage", "h1",
                             extra={"import_dirs": [str(pool_dir)]},
                             **as_identity(d, "h1-storage")), \
            agent_in_process("vm", server.url, tmp_path / "vm", "h1",
                             libvirt_uri=libvirt_test_uri, accelerator="tcg", extra=vm_extra,
                             **as_identity(d, "h1-vm")) as vm_agent:
        op = await connect_bus(server, d, "operator")
        info = await op.call("h1", vm_api.CREATE, VmCreate(
            spec=VmSpec(name="demo", memory_mib=384), image="phyllome-tiny"), timeout=60)
        disk = info.spec.disks[0]
        assert (disk.volume, disk.owned) == ("demo-disk0", True)
        assert hashlib.sha256(Path(disk.path).read_bytes()).hexdigest() == digest
        accepted = await op.call("h1", vm_api.CLONE, VmClone(vm="demo", name="demo2"))

        async def finished() -> bool:
            status = await op.call("h1", vm_api.JOB, JobRef(job_id=accepted.job_id))
            assert status.state in ("running", "succeeded"), status.message
            return status.state == "succeeded"

        await until("the clone to finish", finished, timeout=60, interval=0.1)
        copy = (await op.call("h1", vm_api.INFO, VmRef(vm="demo2"))).spec.disks[0]
        assert hashlib.sha256(Path(copy.path).read_bytes()).hexdigest() == digest
        for name in ("demo", "demo2"):
            await op.call("h1", vm_api.DELETE, VmDelete(vm=name, delete_disks=True))
        assert not Path(disk.path).exists() and not Path(copy.path).exists()
        assert vm_agent.metrics.events_failed._value.get() == 0
        await op.close()


async def test_cli_with_wrong_credentials_exits_unreachable(secure) -> None:  # type: ignore[no-untyped-def]
    server, d, users = secure
    with pytest.raises(Unavailable, match="cannot connect to NATS"):
        await Bus.connect(server.url, name="cli", host="h1", user="operator",
                          password="wrong", ca=str(d / "ca.pem"), give_up_after=5)
    env = {**os.environ, "PHYLLOME_NATS_URL": server.url, "PHYLLOME_NATS_USER": "operator",
           "PHYLLOME_NATS_PASSWORD": "wrong", "PHYLLOME_NATS_CA": str(d / "ca.pem")}
    cli = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli.main", "status", cwd=REPO, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(cli.communicate(), 60)
    assert cli.returncode == 3 and "cannot connect to NATS" in err.decode(), err.decode()
