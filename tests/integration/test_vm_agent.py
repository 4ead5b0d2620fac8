"""The vm agent over the bus, on libvirt's test driver (a fresh host file per test)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import json
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from shared import archs, contracts, subjects
from shared.agent import Agent
from shared.codec import encode
from shared.errors import (
    ArchUnsupported,
    BackendError,
    BadRequest,
    Conflict,
    Forbidden,
    InsufficientResources,
    InvalidName,
    NotFound,
    Unavailable,
)
from shared.jobs import wait_job
from shared.messages import Empty
from shared.messages import catalogue as catalogue_api
from shared.messages import storage as storage_api
from shared.messages import vm as vm_api
from shared.messages.catalogue import PullRequest, SourceAdd
from shared.messages.hardware import GuestArch
from shared.messages.jobs import JobFinished
from shared.messages.net import NetCreate, NetRef, NetworkSpec
from shared.messages.storage import CreateVolume, ListVolumes
from shared.messages.vm import (
    Cdrom,
    CloudInit,
    Disk,
    Nic,
    Share,
    UsbHostdev,
    VmAttachDisk,
    VmAttachNic,
    VmAttachUsb,
    VmClone,
    VmCreate,
    VmDelete,
    VmDetachDisk,
    VmDetachNic,
    VmDetachUsb,
    VmGuestState,
    VmInfo,
    VmInsert,
    VmListRequest,
    VmMigrate,
    VmRef,
    VmSpec,
    VmUpdate,
)
from shared.natsserver import NatsServer
from tests.support.agents import agent_in_process
from tests.support.httpserver import FileServer
from tests.support.libvirt import TEST_HOST_XML, VmEvents, vm_events
from tests.support.sysfs_tree import FIXTURES, build
from tests.support.tarballs import hostile_tpm_states, tpm_state, tree

pytestmark = pytest.mark.integration

HOST = "h1"
FOREIGN = "6d1f3a52-0c4e-4b7a-9f5e-2a8b1c9d0e7f"


@contextlib.asynccontextmanager
async def vm_agent(nats: NatsServer, state: Path, uri: str,
                   **extra: Any) -> AsyncIterator[tuple[Agent, VmEvents]]:
    async with agent_in_process(
        "vm", nats.url, state, host=HOST, libvirt_uri=uri, accelerator="tcg",
        extra={"reconcile_s": 3600, "disk_dir": str(state / "disks"), **extra},
    ) as agent, vm_events(agent) as events:
        yield agent, events


@contextlib.asynccontextmanager
async def hardware_agent(nats: NatsServer, tmp_path: Path, fixture: str) -> AsyncIterator[Agent]:
    """A hardware agent of this host reading the recorded sysfs tree ``fixture``."""
    host = FIXTURES[fixture]()
    tree = build(tmp_path / "sys", host)
    (tmp_path / "proc").mkdir()
    async with agent_in_process(
            "hardware", nats.url, tmp_path / "hw", host=HOST, sysfs_root=str(tree.root),
            extra={"root_dev": host.root_dev, "proc_root": str(tmp_path / "proc")}) as agent:
        yield agent


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


async def test_vm_aarch64_guest_is_refused_where_it_cannot_run(
        nats_server: NatsServer, tmp_path: Path, libvirt_test_uri: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    async with vm_agent(nats_server, tmp_path, libvirt_test_uri) as (agent, _):
        spec = VmSpec(name="arm", arch="aarch64", memory_mib=256, secure_boot=True)
        with pytest.raises(BadRequest, match="KVM runs only x86_64 guests here: use "
                           "--accelerator tcg or auto"):
            await call(agent, "create", VmCreate(spec=msgspec.structs.replace(
                spec, accelerator="kvm")))
        with pytest.raises(BadRequest, match="virt machine has no SATA"):
            await call(agent, "create", VmCreate(spec=msgspec.structs.replace(
                spec, disks=[Disk(path=str(raw_disk(tmp_path / "a.raw")), bus="sata")])))
        monkeypatch.setattr(archs, "guest_arch", lambda arch: GuestArch(
            arch=arch, emulator="/usr/bin/qemu-system-aarch64", uefi=True))
        with pytest.raises(ArchUnsupported, match="host h1 cannot run VM arm: no Secure Boot "
                           "firmware for aarch64 guests"):
            await call(agent, "create", VmCreate(spec=spec))
        monkeypatch.setattr(archs, "guest_arch", lambda arch: GuestArch(arch=arch))
        with pytest.raises(InsufficientResources, match="no qemu-system-aarch64 for aarch64 "
                           "guests \\(apt-get install qemu-system-arm\\)"):
            await call(agent, "create", VmCreate(spec=spec))
        assert (await call(agent, "list", VmListRequest())).vms == []


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


@contextlib.asynccontextmanager
async def agent_events(agent: Agent, kind: str) -> AsyncIterator[asyncio.Queue[Any]]:
    """The vm agent's events of ``kind`` (``device``, ``addresses``) as they arrive."""
    queue: asyncio.Queue[Any] = asyncio.Queue()

    async def got(msg: Any) -> None:
        queue.put_nowait(contracts.event_decoder().decode(msg.data))

    sub = await agent.bus.nc.subscribe(subjects.event(HOST, "vm", kind) + ".*", cb=got)
    try:
        yield queue
    finally:
        await sub.unsubscribe()


def host_route() -> str:
    """A subnet the host routes to (not the default route), or "" when it has none."""
    done = subprocess.run(["ip", "-j", "route"], capture_output=True, text=True)
    routes = [r["dst"] for r in json.loads(done.stdout or "[]") if r.get("dst") != "default"]
    return next((r for r in routes if "/" in r and ipaddress.ip_network(r).version == 4), "")


async def test_vm_networks_phyllome_is_kept_and_colliding_subnets_are_refused(
        nats_server: NatsServer, tmp_path: Path, libvirt_test_uri: str) -> None:
    async with vm_agent(nats_server, tmp_path, libvirt_test_uri) as (agent, _):
        listed = await call(agent, "net_list", Empty())
        assert [(n.name, n.mode, n.active, n.autostart) for n in listed.networks] == [
            ("phyllome", "nat", True, True)]
        phyllome = listed.networks[0]
        assert phyllome.subnet.startswith("10.89.") and phyllome.bridge == "phy-phyllome"
        assert await agent.handlers.networks.ensure_default() is None  # again: no change
        assert (await call(agent, "net_list", Empty())).networks == [phyllome]

        lab = await call(agent, "net_create", NetCreate(spec=NetworkSpec(
            name="lab", subnet="10.77.0.0/24")))
        assert (lab.mode, lab.subnet, lab.active, lab.autostart) == (
            "nat", "10.77.0.0/24", True, True)
        with pytest.raises(Conflict, match="overlaps network lab"):
            await call(agent, "net_create", NetCreate(spec=NetworkSpec(
                name="lab2", mode="isolated", subnet="10.77.0.0/16")))
        with pytest.raises(Conflict, match="overlaps network phyllome"):
            await call(agent, "net_create", NetCreate(spec=NetworkSpec(
                name="lab2", subnet=phyllome.subnet)))
        if route := host_route():
            with pytest.raises(Conflict, match=f"overlaps the host's route to {route}"):
                await call(agent, "net_create", NetCreate(spec=NetworkSpec(
                    name="lab2", subnet=route)))
        with pytest.raises(Conflict, match="exists already"):
            await call(agent, "net_create", NetCreate(spec=NetworkSpec(
                name="lab", subnet="10.78.0.0/24")))
        with pytest.raises(NotFound, match="no bridge nobr0 on this host"):
            await call(agent, "net_create", NetCreate(spec=NetworkSpec(
                name="lan", mode="bridge", bridge="nobr0")))
        with pytest.raises(BadRequest, match="host bits set"):
            await call(agent, "net_create", NetCreate(spec=NetworkSpec(
                name="lab2", subnet="10.79.0.1/24")))
        iso = await call(agent, "net_create", NetCreate(spec=NetworkSpec(
            name="lab2", mode="isolated", subnet="10.79.0.0/24")))
        assert iso.mode == "isolated"

        with pytest.raises(NotFound, match="no network 'nowhere' on h1"):
            await call(agent, "create", VmCreate(spec=VmSpec(
                name="lost", memory_mib=64, nics=[Nic(source="nowhere")])))
        await call(agent, "create", VmCreate(spec=VmSpec(
            name="web", memory_mib=64, nics=[Nic(source="lab")])))
        with pytest.raises(Conflict, match="network lab is used by web"):
            await call(agent, "net_delete", NetRef(name="lab"))
        await call(agent, "delete", VmDelete(vm="web"))
        ack = await call(agent, "net_delete", NetRef(name="lab"))
        assert ack.message == "deleted network lab"
        with pytest.raises(NotFound, match="no network 'lab'"):
            await call(agent, "net_delete", NetRef(name="lab"))
        names = [n.name for n in (await call(agent, "net_list", Empty())).networks]
        assert names == ["lab2", "phyllome"]


async def test_vm_devices_attach_and_detach_on_a_stopped_vm(
        nats_server: NatsServer, tmp_path: Path, libvirt_test_uri: str) -> None:
    # intel-desktop has a Logitech keyboard 046d:c31c on its USB
    async with hardware_agent(nats_server, tmp_path, "intel-desktop"), \
            vm_agent(nats_server, tmp_path / "vm", libvirt_test_uri) as (agent, _), \
            agent_events(agent, "device") as events:
        vm = await call(agent, "create", VmCreate(spec=VmSpec(name="box", memory_mib=64,
                                                              nics=[Nic()])))
        mac = vm.spec.nics[0].mac
        data = raw_disk(tmp_path / "data.raw")

        info = await call(agent, "attach_disk", VmAttachDisk(vm="box", disk=Disk(
            path=str(data), owned=True)))
        assert [(d.path, d.owned) for d in info.spec.disks] == [(str(data), False)]
        ev = await asyncio.wait_for(events.get(), 5)
        assert (ev.action, ev.kind, ev.device, ev.live) == ("attached", "disk", str(data),
                                                             False)
        with pytest.raises(Conflict, match="has disk .* already"):
            await call(agent, "attach_disk", VmAttachDisk(vm="box", disk=Disk(path=str(data))))
        qcow = tmp_path / "q.qcow2"
        qcow.write_bytes(b"QFI\xfb" + bytes(508))
        with pytest.raises(BadRequest):
            await call(agent, "attach_disk", VmAttachDisk(vm="box", disk=Disk(path=str(qcow))))

        info = await call(agent, "attach_nic", VmAttachNic(vm="box", nic=Nic(kind="user")))
        second = info.spec.nics[1].mac
        assert second.startswith("52:54:00:") and second != mac
        with pytest.raises(Conflict, match=f"MAC {mac} already"):
            await call(agent, "attach_nic", VmAttachNic(vm="box", nic=Nic(mac=mac)))
        with pytest.raises(NotFound, match="no network 'nowhere'"):
            await call(agent, "attach_nic", VmAttachNic(vm="box", nic=Nic(source="nowhere")))

        info = await call(agent, "attach_usb", VmAttachUsb(vm="box", device=UsbHostdev(
            vendor="046d", product="c31c")))
        assert info.spec.usb_hostdevs == [UsbHostdev(vendor="046d", product="c31c")]
        with pytest.raises(NotFound, match="no USB device 1234:beef on h1"):
            await call(agent, "attach_usb", VmAttachUsb(vm="box", device=UsbHostdev(
                vendor="1234", product="beef")))
        with pytest.raises(BadRequest, match="bus is 1-255"):
            await call(agent, "attach_usb", VmAttachUsb(vm="box", device=UsbHostdev(bus=0)))
        xml = await agent.handlers.hv.xml(vm.uuid, inactive=True)
        assert "<vendor id='0x046d'/>" in xml and "<product id='0xc31c'/>" in xml
        assert f"<source file='{data}'/>" in xml and xml.count("<interface ") == 2

        # the MACs stay what the spec says across starts
        await call(agent, "start", VmRef(vm="box"))
        live = await agent.handlers.hv.xml(vm.uuid)
        assert f"<mac address='{mac}'/>" in live and f"<mac address='{second}'/>" in live
        await call(agent, "destroy", VmRef(vm="box"))

        await call(agent, "detach_usb", VmDetachUsb(vm="box", device=UsbHostdev(
            vendor="046d", product="c31c")))
        await call(agent, "detach_nic", VmDetachNic(vm="box", mac=second.upper()))
        info = await call(agent, "detach_disk", VmDetachDisk(vm="box", disk=str(data)))
        assert (info.spec.disks, info.spec.usb_hostdevs) == ([], [])
        assert [n.mac for n in info.spec.nics] == [mac]
        with pytest.raises(NotFound, match="has no disk '/nope'"):
            await call(agent, "detach_disk", VmDetachDisk(vm="box", disk="/nope"))
        with pytest.raises(NotFound, match="has no NIC with MAC"):
            await call(agent, "detach_nic", VmDetachNic(vm="box", mac=second))
        record, _ = await agent.handlers.states.load(vm.uuid)
        assert record is not None and record.revision == 7 and record.spec == info.spec
        xml = await agent.handlers.hv.xml(vm.uuid, inactive=True)
        devices = xml.split("</metadata>")[1]
        assert "<hostdev" not in devices and str(data) not in devices
        kinds = []
        while not events.empty():
            ev = events.get_nowait()
            kinds.append((ev.action, ev.kind))
        assert kinds == [("attached", "nic"), ("attached", "usb"), ("detached", "usb"),
                         ("detached", "nic"), ("detached", "disk")]
        assert data.exists()  # detached, not deleted


async def test_vm_a_failed_live_attach_leaves_the_definition_unchanged(
        nats_server: NatsServer, tmp_path: Path, libvirt_test_uri: str) -> None:
    """The test driver cannot attach live: what the VM had stays, in libvirt and in KV."""
    async with vm_agent(nats_server, tmp_path, libvirt_test_uri) as (agent, _):
        vm = await call(agent, "create", VmCreate(spec=VmSpec(name="run", memory_mib=64)))
        await call(agent, "start", VmRef(vm="run"))
        before = await agent.handlers.hv.xml(vm.uuid, inactive=True)
        with pytest.raises(BackendError, match="attaching a device"):
            await call(agent, "attach_disk", VmAttachDisk(vm="run", disk=Disk(
                path=str(raw_disk(tmp_path / "hot.raw")))))
        assert await agent.handlers.hv.xml(vm.uuid, inactive=True) == before
        record, _ = await agent.handlers.states.load(vm.uuid)
        assert record is not None and record.revision == 1 and record.spec.disks == []


async def test_vm_addresses_are_in_info_and_their_changes_are_events(
        nats_server: NatsServer, tmp_path: Path, libvirt_test_uri: str) -> None:
    """The test driver's guest agent answers with an address on the NIC's network."""
    async with vm_agent(nats_server, tmp_path, libvirt_test_uri, address_poll_s=0.1) as (
            agent, _), agent_events(agent, "addresses") as events:
        vm = await call(agent, "create", VmCreate(spec=VmSpec(name="ip", memory_mib=64,
                                                              nics=[Nic()])))
        assert (vm.addresses, vm.address_source) == ([], "")
        await call(agent, "start", VmRef(vm="ip"))
        ev = await asyncio.wait_for(events.get(), 10)
        assert (ev.uuid, ev.name, ev.source) == (vm.uuid, "ip", "agent")
        subnet = (await call(agent, "net_list", Empty())).networks[0].subnet
        [address] = ev.addresses
        assert address.family == "ipv4" and address.mac == vm.spec.nics[0].mac
        assert ipaddress.ip_address(address.address) in ipaddress.ip_network(subnet)
        info = await call(agent, "info", VmRef(vm="ip"))
        assert (info.addresses, info.address_source) == (ev.addresses, "agent")
        await call(agent, "destroy", VmRef(vm="ip"))
        ev = await asyncio.wait_for(events.get(), 10)
        assert (ev.uuid, ev.addresses, ev.source) == (vm.uuid, [], "")
        assert events.empty()


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


async def test_vm_reconcile_keeps_the_record_of_a_vm_defined_after_its_listing(
        nats_server: NatsServer, tmp_path: Path, libvirt_test_uri: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A create that lands between reconciliation's listing of the domains and its read of
    KV ``vms``: the hypervisor is asked again, and the new VM's record stays."""
    async with vm_agent(nats_server, tmp_path, libvirt_test_uri) as (agent, _events):
        states = agent.handlers.states
        before = await states.hv.domains()  # the listing, taken before the create

        async def listing_taken_before() -> Any:
            return before
        info = await call(agent, "create", VmCreate(spec=VmSpec(name="late", memory_mib=64)))
        monkeypatch.setattr(states.hv, "domains", listing_taken_before)
        await states.reconcile()
        kept, _ = await states.load(info.uuid)
        assert kept is not None and kept.spec.name == "late"
        monkeypatch.undo()
        listed = await call(agent, "list", _list_all())
        assert [r.spec.name for r in listed.vms] == ["late"]


async def test_vm_periodic_reconcile_gets_only_its_own_records_between_full_reads(
        nats_server: NatsServer, tmp_path: Path, libvirt_test_uri: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A periodic pass that is not a full one reads no consumer of KV ``vms`` (not every
    host's records): it gets the records this agent wrote, and still drops the one whose
    domain is gone behind its back; a record another writer put there waits for the full
    pass."""
    async with vm_agent(nats_server, tmp_path, libvirt_test_uri) as (agent, events):
        states = agent.handlers.states
        info = await call(agent, "create", VmCreate(spec=VmSpec(name="gone", memory_mib=64)))
        rec, _ = await states.load(info.uuid)
        assert rec is not None
        ghost = msgspec.structs.replace(rec, spec=msgspec.structs.replace(
            rec.spec, name="ghost", uuid="00000000-0000-4000-8000-00000000beef"))
        kv = await agent.bus.kv(subjects.KV_VMS)
        await kv.put(ghost.spec.uuid, encode(ghost))  # not through this agent
        created: list[str] = []

        async def on_created(msg: Any) -> None:
            created.append(msg.subject)

        await agent.bus.nc.subscribe(
            f"$JS.EVENT.ADVISORY.CONSUMER.CREATED.KV_{subjects.KV_VMS}.>", cb=on_created)

        async def nothing_listed() -> list[Any]:
            return []

        async def no_such_domain(uuid: str) -> Any:
            raise NotFound(f"no domain {uuid}")

        monkeypatch.setattr(states.hv, "domains", nothing_listed)  # undefined, event missed
        monkeypatch.setattr(states.hv, "domain", no_such_domain)
        await states.reconcile(full=False)
        ev = await events.next(info.uuid, event="reconciled")
        assert (ev.state, ev.missed) == ("deleted", True)
        assert (await states.load(info.uuid))[0] is None
        assert (await states.load(ghost.spec.uuid))[0] is not None  # not ours to know yet
        await agent.bus.nc.flush()
        assert created == [], created  # no read of the whole bucket
        await states.reconcile()  # the full pass finds it
        ev = await events.next(ghost.spec.uuid, event="reconciled")
        assert (ev.state, ev.missed) == ("deleted", True)
        await agent.bus.nc.flush()
        assert len(created) == 1


async def test_vm_hostdevs_need_the_hardware_agents_word(
        nats_server: NatsServer, tmp_path: Path, libvirt_test_uri: str) -> None:
    """Passthrough is refused unless the hardware agent calls the device bound or bindable."""
    gpu = ["0000:01:00.0", "0000:01:00.1", "0000:01:00.2", "0000:01:00.3"]
    async with hardware_agent(nats_server, tmp_path, "intel-desktop"), \
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
    # the laptop's kvm_intel has nested=N
    async with hardware_agent(nats_server, tmp_path, "laptop"), \
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
        # osinfo's minimum of the image (384 MiB for phyllome-tiny), before any disk is made
        with pytest.raises(BadRequest, match="needs at least 384 MiB of memory and VM demo "
                                             "has 256 MiB"):
            await call(agent, "create", VmCreate(spec=VmSpec(name="demo", memory_mib=256),
                                                 image="phyllome-tiny"), timeout=60)
        assert not (await agent.bus.call(HOST, storage_api.VOLUMES, ListVolumes())).volumes
        info = await call(agent, "create", VmCreate(spec=VmSpec(name="demo", memory_mib=384),
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

        # install media: a blank volume to install onto, and the ISO first in the boot order
        from services.vm.cloudinit import seed_iso

        iso = tmp_path / "installer.iso"
        iso.write_bytes(seed_iso(CloudInit(instance_id="any")))
        with pytest.raises(BadRequest, match="drop --disk-size"):
            await call(agent, "create", VmCreate(spec=VmSpec(name="inst", memory_mib=384),
                                                 image="phyllome-tiny", disk_size_bytes=1 << 30))
        info = await call(agent, "create", VmCreate(spec=VmSpec(
            name="inst", memory_mib=64, cdrom=Cdrom(path=str(iso))), disk_size_bytes=1 << 30))
        blank = info.spec.disks[0]
        assert (blank.volume, blank.owned, Path(blank.path).stat().st_size) == (
            "inst-disk0", True, 1 << 30)
        await call(agent, "delete", VmDelete(vm="inst", delete_disks=True))
        assert not Path(blank.path).exists() and iso.exists()


async def test_vm_create_waits_out_a_pull_of_its_image_that_runs_already(
        nats_server: NatsServer, tmp_path: Path, libvirt_test_uri: str, srv: FileServer) -> None:
    """A create right after `make up` starts the built-in image's pull (or while a user's pull
    runs) waits for that pull instead of saying "pull it first"."""
    raw = raw_disk(srv.root / "slow.raw", 8 << 20)
    with open(raw, "r+b") as f:
        f.write(b"\xebslow")
    digest = hashlib.sha256(raw.read_bytes()).hexdigest()
    (srv.root / "m.json").write_text(json.dumps({"images": [{
        "id": "slow", "name": "Slow", "version": "1", "arch": "x86_64", "url": "slow.raw",
        "sha256": digest, "size": raw.stat().st_size, "format": "raw"}]}))
    srv.rate = 4 << 20  # two seconds of download
    pool_dir = tmp_path / "catalogue" / "pool"
    async with agent_in_process(
            "catalogue", nats_server.url, tmp_path / "catalogue", host=HOST,
            extra={"osinfo_dir": "", "probe_interval_s": 0, "pool_dir": str(pool_dir),
                   "builtin_dir": str(tmp_path / "builtin")}) as catalogue, \
            agent_in_process("storage", nats_server.url, tmp_path / "storage", host=HOST,
                             extra={"import_dirs": [str(pool_dir)]}), \
            vm_agent(nats_server, tmp_path / "vm", libvirt_test_uri) as (agent, _):
        await agent.bus.call(HOST, catalogue_api.SOURCE_ADD, SourceAdd(
            name="m", url=srv.url("m.json")))
        accepted = await agent.bus.call(HOST, catalogue_api.PULL, PullRequest(id="slow"))
        info = await call(agent, "create", VmCreate(spec=VmSpec(name="early", memory_mib=64),
                                                    image="slow"), timeout=60)
        assert catalogue.jobs.get(accepted.job_id).state == "succeeded"
        disk = info.spec.disks[0]
        assert hashlib.sha256(Path(disk.path).read_bytes()).hexdigest() == digest
        await call(agent, "delete", VmDelete(vm="early", delete_disks=True))


async def test_vm_import_state_takes_a_good_state_and_refuses_hostile_ones(
        nats_server: NatsServer, tmp_path: Path, libvirt_test_uri: str) -> None:
    """``vm.import_state`` comes off the bus and writes as root: only plain files inside the
    VM's swtpm folder and an NVRAM file in libvirt's folder may result."""
    libvirt_dir, outside = tmp_path / "libvirt", tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_bytes(b"victim")
    async with vm_agent(nats_server, tmp_path / "vm", libvirt_test_uri,
                        libvirt_dir=str(libvirt_dir)) as (agent, _):
        info = await call(agent, "create", VmCreate(spec=VmSpec(
            name="g1", memory_mib=64, secure_boot=True, tpm="emulated-2.0")))
        good = VmGuestState(uuid=info.uuid, nvram=b"vars" * 1000,
                            tpm=tpm_state({"tpm2/tpm2-00.permall": b"permall"}))
        ack = await call(agent, "import_state", good)
        assert "NVRAM 4000 bytes" in ack.message
        assert (libvirt_dir / "qemu" / "nvram" / "g1_VARS.fd").read_bytes() == good.nvram
        target = libvirt_dir / "swtpm" / info.uuid
        assert (target / "tpm2" / "tpm2-00.permall").read_bytes() == b"permall"
        exported = await call(agent, "export_state", VmRef(vm="g1"))
        assert exported.nvram == good.nvram

        before = {"libvirt": tree(libvirt_dir), "outside": tree(outside)}
        for case, (data, error, match) in hostile_tpm_states(target, outside).items():
            with pytest.raises(error, match=match):
                await call(agent, "import_state", VmGuestState(uuid=info.uuid, tpm=data))
            after = {"libvirt": tree(libvirt_dir), "outside": tree(outside)}
            assert after == before, f"{case}: files changed"


async def test_vm_import_state_never_writes_where_a_domain_points(
        nats_server: NatsServer, tmp_path: Path) -> None:
    """A domain defined outside Phyllome whose <nvram> lies outside libvirt's folder: refused."""
    outside = tmp_path / "outside"
    outside.mkdir()
    host = tmp_path / "host.xml"
    host.write_text(TEST_HOST_XML.replace("</node>", f"""  <domain type='test'>
    <name>foreign</name><uuid>{FOREIGN}</uuid><memory>65536</memory>
    <os><type>hvm</type><loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader>
      <nvram>{outside}/stolen_VARS.fd</nvram></os>
  </domain>
</node>"""))
    async with vm_agent(nats_server, tmp_path / "vm", f"test://{host}",
                        libvirt_dir=str(tmp_path / "libvirt")) as (agent, _):
        await call(agent, "destroy", VmRef(vm="foreign"))
        with pytest.raises(Forbidden, match="outside libvirt's folder"):
            await call(agent, "import_state", VmGuestState(uuid=FOREIGN, nvram=b"x"))
    assert list(outside.iterdir()) == []


async def test_vm_shares_are_checked_on_the_host_and_kept_in_the_definition(
        nats_server: NatsServer, tmp_path: Path, libvirt_test_uri: str) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (tmp_path / "file").write_text("x")
    async with vm_agent(nats_server, tmp_path / "vm", libvirt_test_uri) as (agent, _):
        info = await call(agent, "create", VmCreate(spec=VmSpec(name="fs", memory_mib=64)))
        with pytest.raises(NotFound, match="does not exist on this host: create it"):
            await call(agent, "update", VmUpdate(vm="fs", shares=[
                Share(source=str(tmp_path / "missing"), tag="m")]))
        with pytest.raises(BadRequest, match="is not a directory"):
            await call(agent, "update", VmUpdate(vm="fs", shares=[
                Share(source=str(tmp_path / "file"), tag="f")]))
        info = await call(agent, "update", VmUpdate(vm="fs", shares=[
            Share(source=str(data), tag="data")]))
        assert info.spec.shares == [Share(source=str(data), tag="data")]
        xml = await agent.handlers.hv.xml(info.uuid)
        assert f"<source dir='{data}'/>" in xml and "<access mode='shared'/>" in xml
        info = await call(agent, "update", VmUpdate(vm="fs", shares=[]))
        assert "virtiofs" not in await agent.handlers.hv.xml(info.uuid)
        assert info.vsock_cid == 0


async def test_vm_confidential_needs_the_hosts_technology(
        nats_server: NatsServer, tmp_path: Path, libvirt_test_uri: str) -> None:
    """The EPYC's hardware agent reports SEV-SNP but no boot probe passed (no usable KVM);
    the Sapphire Rapids has no SEV at all; a TCG host refuses before asking."""
    async with hardware_agent(nats_server, tmp_path, "epyc-snp"), \
            vm_agent(nats_server, tmp_path / "vm", libvirt_test_uri) as (agent, _):
        with pytest.raises(BadRequest, match="needs KVM, and VM cc would run under TCG"):
            await call(agent, "create", VmCreate(spec=VmSpec(
                name="cc", memory_mib=64, confidential="sev-snp")))
        with pytest.raises(BadRequest, match="host h1 has no SEV-SNP under a usable KVM"):
            await call(agent, "create", VmCreate(spec=VmSpec(
                name="cc", memory_mib=64, confidential="sev-snp", accelerator="kvm")))
        assert await agent.handlers.hv.domains() == []
        # one defined as on a host with SEV (libvirt 9 knows no sev-snp) stays where it is
        spec = VmSpec(name="cc", uuid=FOREIGN, memory_mib=64, confidential="sev")
        dom = await agent.handlers.hv.define(spec, accelerator="kvm", console_log="/dev/null")
        await agent.handlers.states.write(spec, dom)
        with pytest.raises(BadRequest, match="sev guest.*cannot migrate"):
            await call(agent, "migrate", VmMigrate(vm="cc", to="h2"))


def _seed_of(path: str) -> dict[str, Any]:
    """The meta-data of a seed ISO on disk, read back with pycdlib; checks its label."""
    import io

    import pycdlib
    import yaml

    iso = pycdlib.PyCdlib()
    iso.open(path)
    try:
        assert iso.pvd.volume_identifier.decode().strip() == "cidata"
        out = io.BytesIO()
        iso.get_file_from_iso_fp(out, rr_path="/meta-data")
        meta: dict[str, Any] = yaml.safe_load(out.getvalue())
        return meta
    finally:
        iso.close()


async def test_vm_cloud_init_seed_is_made_cloned_carried_and_deleted(
        nats_server: NatsServer, tmp_path: Path, libvirt_test_uri: str) -> None:
    ci = CloudInit(hostname="web", user="ana")
    async with vm_agent(nats_server, tmp_path, libvirt_test_uri) as (agent, _):
        with pytest.raises(BadRequest, match="RFC 1123"):
            await call(agent, "create", VmCreate(spec=VmSpec(
                name="bad", memory_mib=64, cloud_init=CloudInit(hostname="no_underscore"))))
        assert not list((tmp_path / "disks").glob("*.iso"))
        vm = await call(agent, "create", VmCreate(spec=VmSpec(
            name="web", memory_mib=64, cloud_init=ci, seed="/elsewhere/x.iso")))
        seed = vm.spec.seed
        assert seed == f"{tmp_path}/disks/{vm.uuid}-{HOST}-cidata.iso"
        iid = vm.spec.cloud_init.instance_id
        assert iid.startswith("iid-")
        assert _seed_of(seed) == {"instance-id": iid, "local-hostname": "web"}
        xml = await agent.handlers.hv.xml(vm.uuid, inactive=True)
        assert (f"<disk type='file' device='cdrom'>\n      <driver name='qemu' type='raw'/>\n"
                f"      <source file='{seed}'/>\n      <target dev='sda' bus='scsi'/>\n"
                "      <readonly/>") in xml

        accepted = await call(agent, "clone", VmClone(vm="web", name="web2"))
        assert (await _job(agent, accepted.job_id)).state == "succeeded"
        copy = await call(agent, "info", VmRef(vm="web2"))
        assert copy.spec.seed not in ("", seed)
        assert copy.spec.cloud_init.instance_id not in ("", iid)
        assert _seed_of(copy.spec.seed)["instance-id"] == copy.spec.cloud_init.instance_id

        # what a migration's target gets: the spec with its instance-id, the seed rebuilt
        await call(agent, "delete", VmDelete(vm="web"))
        assert not Path(seed).exists()
        moved = await call(agent, "create", VmCreate(spec=vm.spec))
        assert moved.spec.cloud_init.instance_id == iid and Path(moved.spec.seed).exists()
        await call(agent, "delete", VmDelete(vm="web2"))
        assert not Path(copy.spec.seed).exists()


async def test_vm_install_media_boots_first_and_is_ejected_and_inserted(
        nats_server: NatsServer, tmp_path: Path, libvirt_test_uri: str) -> None:
    from services.vm import cloudinit

    iso = tmp_path / "installer.iso"
    iso.write_bytes(cloudinit.seed_iso(CloudInit(instance_id="any")))  # an ISO9660 volume
    other = tmp_path / "other.iso"
    other.write_bytes(iso.read_bytes())
    async with vm_agent(nats_server, tmp_path / "vm", libvirt_test_uri) as (agent, _), \
            agent_events(agent, "device") as events:
        not_iso = raw_disk(tmp_path / "disk.raw")
        with pytest.raises(BadRequest, match="not an ISO9660 or UDF image"):
            await call(agent, "create", VmCreate(spec=VmSpec(
                name="inst", memory_mib=64, cdrom=Cdrom(path=str(not_iso)))))
        with pytest.raises(Unavailable, match="--disk-size needs the storage agent"):
            await call(agent, "create", VmCreate(spec=VmSpec(
                name="inst", memory_mib=64, cdrom=Cdrom(path=str(iso))),
                disk_size_bytes=1 << 30))
        vm = await call(agent, "create", VmCreate(spec=VmSpec(
            name="inst", memory_mib=64, cdrom=Cdrom(path=str(iso)),
            disks=[Disk(path=str(not_iso))])))
        xml = await agent.handlers.hv.xml(vm.uuid, inactive=True)
        assert "<boot dev='cdrom'/>\n    <boot dev='hd'/>" in xml
        assert f"<source file='{iso}'/>" in xml

        info = await call(agent, "eject", VmRef(vm="inst"))
        assert info.spec.cdrom == Cdrom()
        xml = await agent.handlers.hv.xml(vm.uuid, inactive=True)
        assert str(iso) not in xml.split("</metadata>")[1] and "device='cdrom'" in xml
        assert "<boot dev='cdrom'/>" not in xml
        with pytest.raises(BadRequest, match="not an ISO9660"):
            await call(agent, "insert", VmInsert(vm="inst", path=str(not_iso)))
        info = await call(agent, "insert", VmInsert(vm="inst", path=str(other)))
        assert info.spec.cdrom == Cdrom(path=str(other))
        got = [await asyncio.wait_for(events.get(), 5) for _ in range(2)]
        assert [(e.action, e.kind, e.device, e.live) for e in got] == [
            ("detached", "cdrom", str(iso), False), ("attached", "cdrom", str(other), False)]
        plain = await call(agent, "create", VmCreate(spec=VmSpec(name="plain", memory_mib=64)))
        with pytest.raises(Conflict, match="no CD-ROM drive"):
            await call(agent, "eject", VmRef(vm=plain.uuid))
