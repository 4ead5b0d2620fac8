"""Every endpoint of every agent fuzzed through the real bus.

Per agent: ``FUZZ_PER_AGENT`` messages (10,000 by default; ``PHYLLOME_FUZZ_PER_AGENT`` for a
longer run) spread over its endpoints — shaped requests from hypothesis strategies built on
the msgspec request types, wrong-typed JSON and raw bytes. Before the fuzz, a valid request
per endpoint (``SEEDS``) builds a small world the fuzz's names also hit (VM, volume and image
``demo``, pool ``default``) and proves each endpoint's success path works here.

Pass: every endpoint answered ``ok`` at least once (but those of ``PEER_BOUND``, which cannot
succeed with one agent alone: their seed asserts the exact refusal instead); every reply is a
typed error or a valid result, nothing is logged as an unhandled exception, the agent still
answers, its memory is steady, and no file outside the agent's own directories was created,
changed or removed (the test's directory, /etc/libvirt and libvirt's NVRAM and swtpm
directories are watched).
Replies are counted per endpoint and kind, to show how deep the fuzz got.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest

from services.storage.transfer import volume_digest
from services.vm.cloudinit import seed_iso
from shared import contracts, subjects
from shared.agent import Agent
from shared.config import default_state_dir
from shared.messages import Empty, new_id
from shared.messages.catalogue import ImageRef, ListRequest, PullRequest, SourceAdd, SourceRef
from shared.messages.hardware import (
    BindRequest,
    BootProbe,
    DeviceQuery,
    DeviceRef,
    MdevCreate,
    MdevInfo,
    MdevRef,
    SriovSet,
)
from shared.messages.jobs import JobAccepted, JobRef, JobStatus
from shared.messages.net import NetCreate, NetRef, NetworkSpec
from shared.messages.storage import (
    CloneVolume,
    CreateVolume,
    ExportSnapshot,
    ImportSnapshot,
    ImportVolume,
    ListVolumes,
    ResizeVolume,
    RestoreSnapshot,
    SendVolume,
    SnapshotQuery,
    SnapshotRef,
    TakeSnapshot,
    TransferAbort,
    TransferCommit,
    TransferOffer,
    VolumeQuery,
    VolumeRef,
)
from shared.messages.vm import (
    Cdrom,
    CloudInit,
    ConsoleOpen,
    Disk,
    Nic,
    UsbHostdev,
    VmAttachDisk,
    VmAttachNic,
    VmAttachUsb,
    VmBackup,
    VmBackupSchedule,
    VmClone,
    VmCreate,
    VmDelete,
    VmDetachDisk,
    VmDetachNic,
    VmDetachUsb,
    VmGuestState,
    VmInsert,
    VmListRequest,
    VmMigrate,
    VmRef,
    VmRestore,
    VmScreenshotRequest,
    VmShutdown,
    VmSnapshotCreate,
    VmSnapshotRef,
    VmSnapshotRevert,
    VmSpec,
    VmUpdate,
)
from shared.natsserver import NatsServer
from tests.support.agents import agent_in_process
from tests.support.figures import figure
from tests.support.fuzz import Tally, fuzz_payloads, send
from tests.support.httpserver import FileServer, make_sparse_raw
from tests.support.libvirt import TEST_HOST_XML
from tests.support.sentinel import Sentinel
from tests.support.sysfs_tree import Host, Pci, TreeKernel, build, intel_gvtg

FUZZ_PER_AGENT = int(os.environ.get("PHYLLOME_FUZZ_PER_AGENT", "10000"))
CONCURRENCY = 64
HOST = "fz"
MiB = 1 << 20
KNOWN_KINDS = {"bad_request", "invalid_message", "invalid_name", "payload_too_large",
               "forbidden", "not_found", "conflict", "insufficient_resources", "cancelled",
               "unavailable", "timeout", "backend", "arch_unsupported", "arch_mismatch"}
# Endpoints that only start a job whose effects the fuzz does not need: fewer messages.
SLOW = {"bind", "release", "pull", "refresh", "send", "clone", "import", "start", "reboot",
        "shutdown", "boot_probe"}
# Endpoints that cannot answer ``ok`` here (one agent on the bus, the libvirt test driver),
# each with the refusal its seed must get: (error kind, words of the message). A VM's
# snapshots are taken, reverted to and deleted by the storage agent of its host; a console
# bridges a running QEMU's VNC server, and the test driver gives its "running" guests no VNC
# port. Everything else answers ``ok`` in its seed or the fuzz; keep this set that small.
PEER_BOUND = {"vm": {"snapshot_create": ("unavailable", "storage"),
                     "snapshot_revert": ("unavailable", "storage"),
                     "snapshot_delete": ("unavailable", "storage"),
                     "console": ("conflict", "has no VNC display")}}
# Places outside the test's directory that a request must never reach (state import writes
# NVRAM and swtpm files there for a real libvirt; the fuzz's VMs are on the test driver).
WATCHED = [Path("/etc/libvirt"), Path("/var/lib/libvirt/qemu/nvram"),
           Path("/var/lib/libvirt/swtpm"), Path(default_state_dir()), Path("/etc/phyllome")]
# What each agent may write under its state directory.
WRITES = {"hardware": ["hardware"], "vm": ["vm"], "storage": ["pools", "import", "storage"],
          "catalogue": ["images", "catalogue"]}


def fuzz_host() -> Host:
    """GVT-g mdev types (the iGPU), an SR-IOV NIC and a USB card alone in its group."""
    host = intel_gvtg()
    extra = [
        Pci(addr="0000:00:01.0", vendor=0x8086, device=0x1901, cls=0x060400,
            driver="pcieport", group=5),
        Pci(addr="0000:03:00.0", vendor=0x8086, device=0x10FB, cls=0x020000, driver="ixgbe",
            group=5, parent="0000:00:01.0", sriov_totalvfs=8, vf_device=0x10ED,
            vf_driver="ixgbevf", net=("ens1f0",)),
        Pci(addr="0000:00:1c.0", vendor=0x8086, device=0xA190, cls=0x060400,
            driver="pcieport", group=6),
        Pci(addr="0000:04:00.0", vendor=0x1B21, device=0x1242, cls=0x0C0330,
            driver="xhci_hcd", group=6, parent="0000:00:1c.0"),
    ]
    return replace(host, name="fuzz", devices=[*host.devices, *extra])


def overrides(name: str, tmp: Path) -> dict[str, Any]:
    if name == "hardware":
        tree = build(tmp / "sys", fuzz_host())
        return {"sysfs_root": str(tree.root), "_kernel": TreeKernel(tree)}
    if name == "vm":
        host = tmp / "libvirt-host.xml"
        host.write_text(TEST_HOST_XML)
        return {"libvirt_uri": f"test://{host}", "accelerator": "tcg"}
    if name == "catalogue":
        return {"extra": {"osinfo_dir": "", "probe_interval_s": 0, "auto_pull": []}}
    return {}


def peer_dir(name: str, tmp: Path) -> list[Path]:
    """Where the peer agent a seed starts writes (the storage agent of host ``other``)."""
    return [tmp / "other"] if name == "storage" else []


def rss_mib() -> float:
    """The resident memory of this process now (not its peak)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MiB


# -- seeds: one valid request per endpoint, in an order that builds what the next needs ---------

Call = Callable[[str, Any], Awaitable[Any]]
# refused(verb, request): the seed of a PEER_BOUND endpoint; asserts its expected refusal
Refused = Callable[[str, Any], Awaitable[None]]


async def finished(agent: Agent, accepted: JobAccepted, state: str = "succeeded",
                   says: str = "") -> JobStatus:
    status = await asyncio.wait_for(agent.jobs.wait(accepted.job_id), 60)
    assert status.state == state, f"{accepted.kind} job: {status.state}: {status.message}"
    assert says in status.message, f"{accepted.kind} job: {status.message!r} lacks {says!r}"
    return status


async def jobs(call: Call, job: JobAccepted) -> None:
    await call("jobs", Empty())
    await call("job", JobRef(job_id=job.job_id))
    await call("cancel", JobRef(job_id=job.job_id))  # finished: answers its status


async def seed_hardware(call: Call, agent: Agent, ctx: dict[str, Any],
                        refused: Refused) -> None:
    await call("list", DeviceQuery())
    await call("device", DeviceRef(address="0000:00:02.0"))
    for verb in ("groups", "caps", "report"):
        await call(verb, Empty())
    mdev: MdevInfo = await call("mdev_create", MdevCreate(address="0000:00:02.0",
                                                          mdev_type="i915-GVTg_V5_8"))
    await call("mdev_remove", MdevRef(uuid=mdev.uuid))
    await call("sriov_set", SriovSet(address="0000:03:00.0", num_vfs=2))
    bind = await call("bind", BindRequest(address="0000:04:00.0"))
    await finished(agent, bind)
    await finished(agent, await call("release", DeviceRef(address="0000:04:00.0")))
    await call("boot_probe", BootProbe(result="failed", detail="fuzz seed"))
    await jobs(call, bind)


async def seed_vm(call: Call, agent: Agent, ctx: dict[str, Any], refused: Refused) -> None:
    await call("create", VmCreate(spec=VmSpec(name="demo", firmware="bios", memory_mib=256)))
    await call("list", VmListRequest())
    await call("info", VmRef(vm="demo"))
    await call("update", VmUpdate(vm="demo", vcpus=1, display="vnc"))
    state: VmGuestState = await call("export_state", VmRef(vm="demo"))
    await call("import_state", state)
    clone = await call("clone", VmClone(vm="demo", name="demo2"))
    await finished(agent, clone)
    await call("delete", VmDelete(vm="demo2"))
    for verb in ("start", "suspend", "resume", "reboot", "destroy", "start"):
        await call(verb, VmRef(vm="demo"))
    await refused("console", ConsoleOpen(vm="demo", kind="vnc"))
    shot = await call("screenshot", VmScreenshotRequest(vm="demo", max_width=64))
    assert shot.png.startswith(b"\x89PNG") and shot.width <= 64
    await call("shutdown", VmShutdown(vm="demo", timeout_s=10, force=True))
    await finished(agent, await call("migrate", VmMigrate(vm="demo", to="nohost")), "failed")
    # devices, on the stopped VM: a RAW file, a NIC on a network of its own, USB by bus.device
    own = Path(agent.cfg.state_dir) / "vm"
    raw = make_sparse_raw(own / "seed.raw", MiB)
    await call("attach_disk", VmAttachDisk(vm="demo", disk=Disk(path=str(raw))))
    await call("detach_disk", VmDetachDisk(vm="demo", disk=str(raw)))
    await call("net_list", Empty())
    await call("net_create", NetCreate(spec=NetworkSpec(name="seed", mode="isolated",
                                                        subnet="10.79.0.0/24")))
    info = await call("attach_nic", VmAttachNic(vm="demo", nic=Nic(source="seed")))
    await call("detach_nic", VmDetachNic(vm="demo", mac=info.spec.nics[-1].mac))
    await call("net_delete", NetRef(name="seed"))
    usb = UsbHostdev(bus=1, device=2)
    await call("attach_usb", VmAttachUsb(vm="demo", device=usb))
    await call("detach_usb", VmDetachUsb(vm="demo", device=usb))
    # install media: a VM with a CD-ROM drive, its ISO ejected and put back
    iso = own / "seed.iso"
    iso.write_bytes(seed_iso(CloudInit(instance_id="fuzz")))  # a small ISO9660 volume
    await call("create", VmCreate(spec=VmSpec(name="inst", firmware="bios", memory_mib=256,
                                              cdrom=Cdrom(path=str(iso)))))
    await call("eject", VmRef(vm="inst"))
    await call("insert", VmInsert(vm="inst", path=str(iso)))
    # snapshots and backups: a VM whose disk is a pool volume; with no storage agent on the
    # bus, what needs one is refused (or its job fails) naming it
    await call("snapshot_list", VmSnapshotRef(vm="demo"))  # no pool disk: none, locally
    await call("create", VmCreate(spec=VmSpec(name="vol", firmware="bios", memory_mib=256,
                                              disks=[Disk(path=str(raw), volume="vol")])))
    await refused("snapshot_create", VmSnapshotCreate(vm="vol", name="s1"))
    await refused("snapshot_revert", VmSnapshotRevert(vm="vol", name="s1"))
    await refused("snapshot_delete", VmSnapshotRef(vm="vol", name="s1"))
    backups = own / "backups"
    await finished(agent, await call("backup", VmBackup(vm="vol", to=str(backups))), "failed",
                   "storage")
    await finished(agent, await call("restore", VmRestore(archive=str(backups / "x.phybak"))),
                   "failed", "storage")
    listed = await call("schedule_backup", VmBackupSchedule(vm="vol", to=str(backups),
                                                            every_s=3600))
    assert [s.vm for s in listed.schedules] == ["vol"]
    await call("schedule_backup", VmBackupSchedule(vm="vol"))  # every_s 0: removed
    assert (await call("backup_schedules", Empty())).schedules == []
    await jobs(call, clone)


async def seed_storage(call: Call, agent: Agent, ctx: dict[str, Any],
                       refused: Refused) -> None:
    await call("pools", Empty())
    await call("create", CreateVolume(name="demo", size_bytes=MiB))
    await call("resize", ResizeVolume(name="demo", size_bytes=2 * MiB))
    await call("volumes", ListVolumes())
    await call("info", VolumeQuery(name="demo", sha256=True))
    clone = await call("clone", CloneVolume(name="demo", dst_name="demo2"))
    await finished(agent, clone)
    await call("delete", VolumeRef(name="demo2"))
    source = Path(agent.cfg.state_dir) / "import" / "disk.raw"
    source.parent.mkdir(exist_ok=True)
    make_sparse_raw(source, 2 * MiB)
    await finished(agent, await call("import_file", ImportVolume(name="imported",
                                                                 source=str(source))))
    # a send needs a receiver: the storage agent of host ``other``, for this seed only
    async with agent_in_process("storage", ctx["nats_url"], ctx["tmp"] / "other", "other"):
        await finished(agent, await call("send", SendVolume(name="demo", to_host="other",
                                                            dst_name="sent")))
    # snapshots: taken, listed, read, restored over their volume, archived, read back
    await call("snapshot", TakeSnapshot(owner="seed", name="s1", disks=[VolumeRef(name="demo")],
                                        files={"note": b"seed"}))
    await call("snapshots", SnapshotQuery())
    content = await call("snapshot_read", SnapshotRef(owner="seed", name="s1"))
    assert content.files == {"note": b"seed"}
    await call("snapshot_restore", RestoreSnapshot(owner="seed", name="s1"))
    backups = Path(agent.cfg.state_dir) / "storage" / "backups"
    backups.mkdir(parents=True, exist_ok=True)
    exported = await finished(agent, await call("snapshot_export", ExportSnapshot(
        owner="seed", name="s1", dir=str(backups))))
    await finished(agent, await call("snapshot_import", ImportSnapshot(
        archive=str(exported.result["archive"]), owner="seed2", name="s1")))
    await call("snapshot_delete", SnapshotRef(owner="seed", name="s1"))
    for name, verb in (("received", "receive_commit"), ("aborted", "receive_abort")):
        offer = TransferOffer(transfer_id=new_id(), src_host="elsewhere", src_pool="default",
                              src_name="x", pool="default", name=name, virtual_bytes=MiB,
                              extents=[], source_stamp="seed")
        await call("receive", offer)
        await call("incoming", Empty())
        if verb == "receive_commit":  # no data extents: nothing to send before the commit
            await call(verb, TransferCommit(transfer_id=offer.transfer_id,
                                            sha256=volume_digest(MiB, {})))
        else:
            await call(verb, TransferAbort(transfer_id=offer.transfer_id, reason="seed"))
    await jobs(call, clone)


async def seed_catalogue(call: Call, agent: Agent, ctx: dict[str, Any],
                        refused: Refused) -> None:
    srv: FileServer = ctx["srv"]
    await call("sources", Empty())
    for name in ("demo", "gone"):
        await call("source_add", SourceAdd(name=name, url=srv.url(f"{name}.json")))
    await call("refresh", Empty())
    await call("list", ListRequest())
    await call("info", ImageRef(id="demo"))
    pull = await call("pull", PullRequest(id="demo"))
    await finished(agent, pull)
    await call("remove", ImageRef(id="demo"))
    await call("source_remove", SourceRef(name="gone"))
    await jobs(call, pull)


SEEDS = {"hardware": seed_hardware, "vm": seed_vm, "storage": seed_storage,
         "catalogue": seed_catalogue}


@pytest.fixture
def mirror(srv: FileServer) -> FileServer:
    """Two manifest sources, ``demo`` and ``gone``, each with one small verified image."""
    for name in ("demo", "gone"):
        raw = make_sparse_raw(srv.root / f"{name}.raw", 2 * MiB)
        (srv.root / f"{name}.json").write_text(json.dumps({"images": [{
            "id": name, "name": name, "arch": "x86_64", "url": raw.name, "format": "raw",
            "size": raw.stat().st_size,
            "sha256": hashlib.sha256(raw.read_bytes()).hexdigest()}]}))
    return srv


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", subjects.SERVICES)
async def test_fuzz_agent_endpoints(name: str, nats_server: NatsServer, tmp_path: Path,
                                    mirror: FileServer,
                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    specs = contracts.endpoints(name)
    weights = {s.verb: (1 if s.verb in SLOW else 4) for s in specs}
    unit = FUZZ_PER_AGENT / sum(weights.values())
    plan = [(s, p) for s in specs
            for p in fuzz_payloads(s.request, max(20, int(unit * weights[s.verb])))]
    opts = overrides(name, tmp_path)
    kernel = opts.pop("_kernel", None)
    state = tmp_path / "state"
    allowed = [tmp_path / "nats", *(state / d for d in WRITES[name]),
               *peer_dir(name, tmp_path)]
    if kernel is not None:
        allowed.append(tmp_path / "sys")  # the hardware agent writes sysfs: its job
    for d in allowed:
        d.mkdir(parents=True, exist_ok=True)
    (tmp_path / "bait").mkdir()
    (tmp_path / "bait" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    sentinel = Sentinel([tmp_path, *WATCHED], allowed)
    tally = Tally([s.verb for s in specs])
    async with agent_in_process(name, nats_server.url, state, HOST, **opts) as agent:
        if kernel is not None:
            agent.handlers.fs.after_write = kernel
        nc = await nats.connect(nats_server.url)
        gate = asyncio.Semaphore(CONCURRENCY)
        problems: list[str] = []
        by_verb = {s.verb: s for s in specs}

        async def seed_call(verb: str, req: Any) -> Any:
            kind, reply = await send(nc, HOST, name, by_verb[verb], msgspec.json.encode(req))
            tally.add(verb, kind, seed=True)
            assert kind == "ok", f"seed {name}.{verb}({req!r:.200}) answered {kind}: {reply}"
            return reply

        async def seed_refused(verb: str, req: Any) -> None:
            want, words = PEER_BOUND[name][verb]
            kind, reply = await send(nc, HOST, name, by_verb[verb], msgspec.json.encode(req))
            assert (kind, words in getattr(reply, "message", "")) == (want, True), \
                f"seed {name}.{verb}({req!r:.200}) answered {kind}: {reply}; want {want} " \
                f"saying {words!r}"

        async def fuzz(spec: Any, payload: bytes) -> None:
            async with gate:
                kind, reply = await send(nc, HOST, name, spec, payload)
            tally.add(spec.verb, kind)
            if kind not in KNOWN_KINDS | {"ok"}:
                problems.append(f"{spec.verb}: {kind} for {payload[:120]!r}: {reply}")

        await SEEDS[name](seed_call, agent,
                          {"srv": mirror, "nats_url": nats_server.url, "tmp": tmp_path},
                          seed_refused)
        started = time.perf_counter()
        half = len(plan) // 2
        await asyncio.gather(*(fuzz(s, p) for s, p in plan[:half]))
        gc.collect()
        rss_half = rss_mib()
        await asyncio.gather(*(fuzz(s, p) for s, p in plan[half:]))
        gc.collect()
        rss_end = rss_mib()
        took = time.perf_counter() - started
        ping = await nc.request(f"$SRV.PING.{subjects.micro_name(name)}", b"", timeout=5)
        assert b'"fz"' in ping.data, "the agent stopped answering"
        await nc.close()
    print(f"\n{name}: replies per endpoint and kind\n{tally.table()}")
    assert not problems, "\n".join(problems[:20])
    unhandled = [r for r in caplog.records if r.exc_info]
    assert not unhandled, f"{len(unhandled)} unhandled: {unhandled[0].getMessage()}"
    missing = [v for v in tally.without_ok() if v not in PEER_BOUND.get(name, {})]
    assert not missing, f"no ok reply from {missing}:\n{tally.table()}"
    assert not tally.never_decoded(), f"the fuzz never got past the decoder of " \
                                      f"{tally.never_decoded()}:\n{tally.table()}"
    assert tally.total() == len(plan) >= 0.95 * FUZZ_PER_AGENT
    changed = sentinel.changes()
    assert not changed, f"files touched outside the agent's directories: {changed[:20]}"
    # ~10 MiB in CI runs; the bound only catches a leak that grows with every message
    assert rss_end - rss_half < 256, f"memory grew {rss_end - rss_half:.0f} MiB in the 2nd half"
    figure(f"fuzz {name}", messages=len(plan), endpoints=len(specs),
           ok=tally.total("ok"), typed_errors=tally.total() - tally.total("ok"), unhandled=0,
           seconds=round(took, 1), rss_growth_2nd_half_mib=round(rss_end - rss_half, 1),
           per_endpoint={v: dict(c) for v, c in tally.kinds.items()})


def test_the_sentinel_sees_what_it_must(tmp_path: Path) -> None:
    (tmp_path / "allowed").mkdir()
    (tmp_path / "kept").write_text("a")
    (tmp_path / "changed").write_text("a")
    (tmp_path / "removed").write_text("a")
    sentinel = Sentinel([tmp_path], [tmp_path / "allowed"])
    (tmp_path / "allowed" / "new").write_text("fine")
    (tmp_path / "changed").write_text("bb")
    (tmp_path / "removed").unlink()
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "new").symlink_to("/etc/passwd")
    assert sentinel.changes() == [f"created {tmp_path}/sub", f"created {tmp_path}/sub/new",
                                  f"removed {tmp_path}/removed", f"changed {tmp_path}/changed"]
