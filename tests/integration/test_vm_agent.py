"""The vm agent over the bus, on libvirt's test driver (a fresh host file per test)."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from shared import contracts, subjects
from shared.agent import Agent
from shared.codec import encode
from shared.errors import (
    BadRequest,
    Conflict,
    InsufficientResources,
    InvalidName,
    NotFound,
    Unavailable,
)
from shared.jobs import wait_job
from shared.messages import storage as storage_api
from shared.messages import vm as vm_api
from shared.messages.jobs import JobFinished
from shared.messages.storage import CreateVolume, ListVolumes
from shared.messages.vm import (
    Disk,
    Nic,
    VmClone,
    VmCreate,
    VmDelete,
    VmInfo,
    VmListRequest,
    VmRef,
    VmSpec,
    VmUpdate,
)
from shared.natsserver import NatsServer
from tests.support.agents import agent_in_process
from tests.support.libvirt import VmEvents, libvirt_test_uri, vm_events
from tests.support.nats import nats_server
from tests.support.sysfs_tree import FIXTURES, build

__all__ = ["libvirt_test_uri", "nats_server"]
pytestmark = pytest.mark.integration

HOST = "h1"


@contextlib.asynccontextmanager
async def vm_agent(nats: NatsServer, state: Path, uri: str,
                   **extra: Any) -> AsyncIterator[tuple[Agent, VmEvents]]:
    async with agent_in_process(
        "vm", nats.url, state, host=HOST, libvirt_uri=uri, accelerator="tcg",
        extra={"reconcile_s": 3600, "disk_dir": str(state / "disks"), **extra},
    ) as agent, vm_events(agent) as events:
        yield agent, events


async def call(agent: Agent, verb: str, req: Any, timeout: float = 10.0) -> Any:
    return await agent.bus.call(HOST, contracts.spec("vm", verb), req, timeout=timeout)


def raw_disk(path: Path, size: int = 1 << 20) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


async def test_vm_lifecycle_over_the_bus(nats_server: NatsServer, tmp_path: Path,
                                         libvirt_test_uri: str) -> None:
    async with vm_agent(nats_server, tmp_path, libvirt_test_uri) as (agent, events):
        disk = raw_disk(tmp_path / "d.raw")
        spec = VmSpec(name="web-1", memory_mib=256, display="both", secure_boot=True,
                      tpm="emulated-2.0", disks=[Disk(path=str(disk))], nics=[Nic()])
        info: VmInfo = await call(agent, "create", VmCreate(spec=spec))
        assert (info.state, info.accelerator, info.host) == ("shutoff", "tcg", HOST)
        assert info.spec.nics[0].mac.startswith("52:54:00:")
        assert (await events.next(info.uuid)).event == "defined"

        info = await call(agent, "start", VmRef(vm="web-1"))
        assert info.state == "running"
        ev = await events.next(info.uuid, event="started")
        assert (ev.state, ev.reason, ev.name) == ("running", "booted", "web-1")

        with pytest.raises(Conflict, match="running already"):
            await call(agent, "start", VmRef(vm="web-1"))
        with pytest.raises(Conflict, match="stop it first, or delete with --force"):
            await call(agent, "delete", VmDelete(vm="web-1"))
        with pytest.raises(Conflict, match="update changes a stopped VM"):
            await call(agent, "update", VmUpdate(vm="web-1", vcpus=4))

        await call(agent, "suspend", VmRef(vm=info.uuid))
        assert (await events.next(info.uuid, event="suspended")).state == "paused"
        await call(agent, "resume", VmRef(vm="web-1"))
        assert (await events.next(info.uuid, event="resumed")).state == "running"
        await call(agent, "destroy", VmRef(vm="web-1"))
        ev = await events.next(info.uuid, event="stopped")
        assert (ev.state, ev.reason) == ("shutoff", "destroyed")

        listed = await call(agent, "list", _list_all())
        assert [(r.spec.name, r.state) for r in listed.vms] == [("web-1", "shutoff")]

        info = await call(agent, "update", VmUpdate(vm="web-1", vcpus=4, memory_mib=512))
        assert (info.vcpus, info.memory_mib) == (4, 512)
        record, _ = await agent.handlers.states.load(info.uuid)
        assert record is not None and record.revision == 2 and record.spec.vcpus == 4

        ack = await call(agent, "delete", VmDelete(vm="web-1"))
        assert "deleted VM web-1" in ack.message
        ev = await events.next(info.uuid, event="undefined")
        assert ev.state == "deleted"
        assert (await call(agent, "list", _list_all())).vms == []
        assert disk.exists()  # not owned by the VM: never deleted


def _list_all() -> VmListRequest:
    return VmListRequest(all_hosts=True)


async def test_vm_bad_input_is_refused_and_nothing_is_left(
        nats_server: NatsServer, tmp_path: Path, libvirt_test_uri: str) -> None:
    async with vm_agent(nats_server, tmp_path, libvirt_test_uri) as (agent, _):
        qcow = tmp_path / "q.qcow2"
        qcow.write_bytes(b"QFI\xfb" + bytes(508))
        cases: list[tuple[VmSpec, type[Exception], str]] = [
            (VmSpec(name='bad"name'), InvalidName, "not valid"),
            (VmSpec(name="a<b"), InvalidName, "not valid"),
            (VmSpec(name="a/b"), InvalidName, "not valid"),
            (VmSpec(name="a b"), InvalidName, "not valid"),
            (VmSpec(name="x" * 200), InvalidName, "not valid"),
            (VmSpec(name="m0", memory_mib=0), BadRequest, "at least 16 MiB"),
            (VmSpec(name="big", memory_mib=64 * 1024), InsufficientResources, "host h1 has"),
            (VmSpec(name="q", disks=[Disk(path=str(qcow))]), BadRequest, "is qcow2, not RAW"),
            (VmSpec(name="hd", hostdevs=["0000:01:00.0"]), Unavailable, "hardware agent"),
            (VmSpec(name="n", nested=True), BadRequest, "nested virtualization needs KVM"),
        ]
        for spec, error, match in cases:
            with pytest.raises(error, match=match):
                await call(agent, "create", VmCreate(spec=spec))
        for verb in ("start", "reboot", "info"):
            with pytest.raises(InvalidName, match="VM name"):
                await call(agent, verb, VmRef(vm="\x00"))
        await call(agent, "create", VmCreate(spec=VmSpec(name="dup", memory_mib=64)))
        with pytest.raises(Conflict, match="exists already"):
            await call(agent, "create", VmCreate(spec=VmSpec(name="dup", memory_mib=64)))
        domains = await agent.handlers.hv.domains()
        assert [d.name for d in domains] == ["dup"]
        assert [r.spec.name for r in (await call(agent, "list", _list_all())).vms] == ["dup"]


async def test_vm_create_is_idempotent_with_a_key(nats_server: NatsServer, tmp_path: Path,
                                                  libvirt_test_uri: str) -> None:
    async with vm_agent(nats_server, tmp_path, libvirt_test_uri) as (agent, _):
        req = VmCreate(spec=VmSpec(name="once", memory_mib=64))
        first = await agent.bus.call(HOST, vm_api.CREATE, req, idempotency_key="k1")
        again = await agent.bus.call(HOST, vm_api.CREATE, req, idempotency_key="k1")
        assert first.uuid == again.uuid
        assert len(await agent.handlers.hv.domains()) == 1


async def test_vm_accelerator_can_be_forced(nats_server: NatsServer, tmp_path: Path,
                                            libvirt_test_uri: str) -> None:
    async with vm_agent(nats_server, tmp_path, libvirt_test_uri) as (agent, _):
        kvm = await call(agent, "create", VmCreate(spec=VmSpec(
            name="k", memory_mib=64, accelerator="kvm", nested=True)))
        tcg = await call(agent, "create", VmCreate(spec=VmSpec(name="t", memory_mib=64)))
        assert (kvm.accelerator, tcg.accelerator) == ("kvm", "tcg")
        assert "<domain type='kvm'" in await agent.handlers.hv.xml(kvm.uuid)
        assert "<domain type='qemu'" in await agent.handlers.hv.xml(tcg.uuid)
        assert tcg.accelerator_note == "accelerator forced to tcg by configuration"


async def test_vm_clone_copies_disks_and_gets_new_identity(
        nats_server: NatsServer, tmp_path: Path, libvirt_test_uri: str) -> None:
    async with vm_agent(nats_server, tmp_path, libvirt_test_uri) as (agent, _):
        disk = raw_disk(tmp_path / "src.raw")
        with open(disk, "r+b") as f:
            f.seek(4096)
            f.write(b"phyllome")
        src = await call(agent, "create", VmCreate(spec=VmSpec(
            name="src", memory_mib=64, disks=[Disk(path=str(disk))], nics=[Nic()])))
        await call(agent, "start", VmRef(vm="src"))
        with pytest.raises(Conflict, match="clone needs a stopped VM"):
            await call(agent, "clone", VmClone(vm="src", name="copy"))
        await call(agent, "destroy", VmRef(vm="src"))
        with pytest.raises(InvalidName):
            await call(agent, "clone", VmClone(vm="src", name="no/slash"))
        accepted = await call(agent, "clone", VmClone(vm="src", name="copy"))
        status = await _job(agent, accepted.job_id)
        assert status.state == "succeeded", status.message
        copy = await call(agent, "info", VmRef(vm="copy"))
        assert copy.uuid != src.uuid
        assert copy.spec.nics[0].mac != src.spec.nics[0].mac
        new_disk = Path(copy.spec.disks[0].path)
        assert new_disk != disk and copy.spec.disks[0].owned
        assert new_disk.read_bytes() == disk.read_bytes()
        await call(agent, "delete", VmDelete(vm="copy", delete_disks=True))
        assert not new_disk.exists() and disk.exists()


async def _job(agent: Agent, job_id: str) -> JobFinished:
    return await wait_job(agent.bus, agent.host, "vm", job_id, timeout=20)


async def test_vm_reconcile_corrects_kv_and_emits_missed_events(
        nats_server: NatsServer, tmp_path: Path, libvirt_test_uri: str) -> None:
    async with vm_agent(nats_server, tmp_path, libvirt_test_uri) as (agent, events):
        info = await call(agent, "create", VmCreate(spec=VmSpec(name="r", memory_mib=64)))
        kv = await agent.bus.kv(subjects.KV_VMS)
        stale, _ = await agent.handlers.states.load(info.uuid)
        assert stale is not None
        await kv.put(info.uuid, encode(msgspec.structs.replace(stale, state="running")))
        ghost = msgspec.structs.replace(
            stale, spec=msgspec.structs.replace(stale.spec, name="ghost",
                                                uuid="00000000-0000-4000-8000-00000000beef"))
        await kv.put(ghost.spec.uuid, encode(ghost))
        await agent.handlers.states.reconcile()
        ev = await events.next(info.uuid, event="reconciled")
        assert (ev.state, ev.missed) == ("shutoff", True)
        ev = await events.next(ghost.spec.uuid)
        assert (ev.state, ev.missed) == ("deleted", True)
        fixed, _ = await agent.handlers.states.load(info.uuid)
        assert fixed is not None and fixed.state == "shutoff"
        listed = await call(agent, "list", _list_all())
        assert [r.spec.name for r in listed.vms] == ["r"]
        stream = await agent.bus.js.stream_info(f"KV_{subjects.KV_VMS}")
        assert stream.state.consumer_count == 0  # each read removes its consumer


async def test_vm_hostdevs_need_the_hardware_agents_word(
        nats_server: NatsServer, tmp_path: Path, libvirt_test_uri: str) -> None:
    """Passthrough is refused unless the hardware agent calls the device bound or bindable."""
    host = FIXTURES["intel-desktop"]()
    tree = build(tmp_path / "sys", host)
    (tmp_path / "proc").mkdir()
    gpu = ["0000:01:00.0", "0000:01:00.1", "0000:01:00.2", "0000:01:00.3"]
    async with agent_in_process(
            "hardware", nats_server.url, tmp_path / "hw", host=HOST,
            sysfs_root=str(tree.root),
            extra={"root_dev": host.root_dev, "proc_root": str(tmp_path / "proc")}), \
            vm_agent(nats_server, tmp_path / "vm", libvirt_test_uri) as (agent, _):
        with pytest.raises(Conflict, match="must be passed together with 0000:01:00.1"):
            await call(agent, "create", VmCreate(spec=VmSpec(
                name="gpu1", memory_mib=64, hostdevs=gpu[:1])))
        with pytest.raises(Conflict, match="cannot be bound"):
            await call(agent, "create", VmCreate(spec=VmSpec(
                name="audio", memory_mib=64, hostdevs=["0000:00:1f.3"])))
        with pytest.raises(NotFound, match="no mediated device"):
            await call(agent, "create", VmCreate(spec=VmSpec(
                name="mdev", memory_mib=64, hostdevs=["b1a2c3d4-0000-4000-8000-000000000001"])))
        info = await call(agent, "create", VmCreate(spec=VmSpec(
            name="gpu", memory_mib=64, hostdevs=gpu, nested=True, accelerator="kvm")))
        xml = await agent.handlers.hv.xml(info.uuid)
        assert xml.count("<hostdev mode='subsystem' type='pci' managed='yes'>") == 4
        assert "<cpu mode='host-passthrough'" in xml  # kvm_intel nested=Y on this host
        assert [d.name for d in await agent.handlers.hv.domains()] == ["gpu"]


async def test_vm_nested_is_refused_where_the_kvm_module_has_it_off(
        nats_server: NatsServer, tmp_path: Path, libvirt_test_uri: str) -> None:
    host = FIXTURES["laptop"]()  # kvm_intel nested=N
    tree = build(tmp_path / "sys", host)
    (tmp_path / "proc").mkdir()
    async with agent_in_process(
            "hardware", nats_server.url, tmp_path / "hw", host=HOST,
            sysfs_root=str(tree.root),
            extra={"root_dev": host.root_dev, "proc_root": str(tmp_path / "proc")}), \
            vm_agent(nats_server, tmp_path / "vm", libvirt_test_uri) as (agent, _):
        with pytest.raises(BadRequest, match="does not allow nested virtualization.*nested=1"):
            await call(agent, "create", VmCreate(spec=VmSpec(
                name="nest", memory_mib=64, nested=True, accelerator="kvm")))
        assert await agent.handlers.hv.domains() == []


async def test_vm_from_image_gets_a_storage_volume_cloned_from_the_catalogue(
        nats_server: NatsServer, tmp_path: Path, libvirt_test_uri: str) -> None:
    """`vm create --image`: the catalogue says where the image is (it adopts built-in images
    at start); storage copies it into a volume that the VM owns."""
    tiny = tmp_path / "builtin" / "phyllome-tiny"
    tiny.mkdir(parents=True)
    image = raw_disk(tiny / "disk.raw", 4 << 20)
    with open(image, "r+b") as f:
        f.write(b"\xebphyllome-tiny")
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    (tiny / "manifest.json").write_text(json.dumps({"files": {"disk.raw": {
        "sha256": digest, "size": image.stat().st_size}}}))
    pool_dir = tmp_path / "catalogue" / "pool"
    async with agent_in_process(
            "catalogue", nats_server.url, tmp_path / "catalogue", host=HOST,
            extra={"osinfo_dir": "", "probe_interval_s": 0, "builtin_dir": str(tiny.parent),
                   "pool_dir": str(pool_dir)}), \
            agent_in_process("storage", nats_server.url, tmp_path / "storage", host=HOST,
                             extra={"import_dirs": [str(pool_dir)]}), \
            vm_agent(nats_server, tmp_path / "vm", libvirt_test_uri) as (agent, _):
        info = await call(agent, "create", VmCreate(spec=VmSpec(name="demo", memory_mib=256),
                                                    image="phyllome-tiny"), timeout=60)
        disk = info.spec.disks[0]
        assert (disk.pool, disk.volume, disk.owned) == ("default", "demo-disk0", True)
        assert hashlib.sha256(Path(disk.path).read_bytes()).hexdigest() == digest
        accepted = await call(agent, "clone", VmClone(vm="demo", name="demo2"))
        assert (await _job(agent, accepted.job_id)).state == "succeeded"
        copy = (await call(agent, "info", VmRef(vm="demo2"))).spec.disks[0]
        assert (copy.pool, copy.volume, copy.owned) == ("default", "demo2-disk0", True)
        assert hashlib.sha256(Path(copy.path).read_bytes()).hexdigest() == digest
        for name in ("demo", "demo2"):
            await call(agent, "delete", VmDelete(vm=name, delete_disks=True))
        assert not Path(disk.path).exists() and not Path(copy.path).exists()

        data = await agent.bus.call(HOST, storage_api.CREATE, CreateVolume(
            name="data", size_bytes=1 << 20))
        info = await call(agent, "create", VmCreate(spec=VmSpec(
            name="vol", memory_mib=64, disks=[Disk(volume="data")])))
        assert (info.spec.disks[0].path, info.spec.disks[0].owned) == (data.path, False)
        await call(agent, "delete", VmDelete(vm="vol", delete_disks=True))
        assert Path(data.path).exists()  # given, not made for the VM: kept
        with pytest.raises(NotFound):
            await call(agent, "create", VmCreate(spec=VmSpec(
                name="vol", memory_mib=64, disks=[Disk(volume="missing")])))
        volumes = (await agent.bus.call(HOST, storage_api.VOLUMES, ListVolumes())).volumes
        assert [v.name for v in volumes] == ["data"]
