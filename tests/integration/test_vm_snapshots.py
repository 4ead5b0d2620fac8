"""Snapshots, backups and restores of whole VMs over the bus: the real vm agent (libvirt's
test driver, NVRAM and TPM state in a folder of the test) and the real storage agent."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zstandard

from services.storage import archive
from services.vm import snapshots as vmsnap
from shared import contracts, subjects
from shared.agent import Agent
from shared.codec import decode
from shared.errors import BadRequest, Conflict, InvalidName, NotFound
from shared.jobs import wait_job
from shared.messages import Empty
from shared.messages import storage as storage_api
from shared.messages import vm as vm_api
from shared.messages.jobs import JobFinished
from shared.messages.storage import CreateVolume, ListVolumes, SnapshotQuery
from shared.messages.vm import (
    Disk,
    Nic,
    VmBackup,
    VmBackupSchedule,
    VmCreate,
    VmDelete,
    VmGuestState,
    VmInfo,
    VmRef,
    VmRestore,
    VmSnapshotChanged,
    VmSnapshotCreate,
    VmSnapshotRef,
    VmSnapshotRevert,
    VmSpec,
    VmUpdate,
)
from shared.natsserver import NatsServer
from tests.support.agents import agent_in_process
from tests.support.tarballs import tpm_state
from tests.support.wait import until

pytestmark = pytest.mark.integration

HOST = "h1"
MiB = 1 << 20


class Host:
    """A vm and a storage agent of one host, with helpers to look at what they keep."""

    def __init__(self, vm: Agent, storage: Agent, root: Path) -> None:
        self.vm, self.storage, self.root = vm, storage, root
        self.libvirt = root / "libvirt"
        self.snapshot_events: list[VmSnapshotChanged] = []

    async def call(self, verb: str, req: Any, timeout: float = 30.0) -> Any:
        return await self.vm.bus.call(HOST, contracts.spec("vm", verb), req, timeout=timeout)

    async def job(self, verb: str, req: Any) -> JobFinished:
        accepted = await self.call(verb, req)
        return await wait_job(self.vm.bus, HOST, "vm", accepted.job_id, timeout=60)

    async def vm_with_state(self, name: str, data: bytes, nvram: bytes, tpm: bytes,
                            **spec: Any) -> VmInfo:
        """A UEFI VM with a TPM, one volume disk holding ``data`` at 1 MiB, and state."""
        vol = await self.storage.bus.call(HOST, storage_api.CREATE, CreateVolume(
            name=f"{name}-disk0", size_bytes=16 * MiB))
        write(Path(vol.path), data)
        info = await self.call("create", VmCreate(spec=VmSpec(
            name=name, memory_mib=64, secure_boot=True, tpm="emulated-2.0", nics=[Nic()],
            disks=[Disk(volume=f"{name}-disk0", owned=True)], **spec)))
        await self.call("import_state", VmGuestState(uuid=info.uuid, nvram=nvram,
                                                     tpm=tpm_state({"tpm2/permall": tpm})))
        return info

    def nvram(self, name: str) -> bytes:
        return (self.libvirt / "qemu" / "nvram" / f"{name}_VARS.fd").read_bytes()

    def tpm(self, uuid: str) -> bytes:
        return (self.libvirt / "swtpm" / uuid / "tpm2" / "permall").read_bytes()

    async def volumes(self) -> list[str]:
        found = await self.storage.bus.call(HOST, storage_api.VOLUMES, ListVolumes())
        return [v.name for v in found.volumes]

    async def snapshots(self, owner: str = "") -> list[str]:
        found = await self.storage.bus.call(HOST, storage_api.SNAPSHOTS,
                                            SnapshotQuery(owner=owner))
        return [f"{i.labels.get('vm')}/{i.name}" for i in found.snapshots]


def write(path: Path, data: bytes, at: int = MiB) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(data)


def read(path: str, n: int, at: int = MiB) -> bytes:
    with open(path, "rb") as f:
        f.seek(at)
        return f.read(n)


@contextlib.asynccontextmanager
async def host(nats: NatsServer, root: Path, uri: str) -> AsyncIterator[Host]:
    async with agent_in_process("storage", nats.url, root / "storage", host=HOST) as storage, \
            agent_in_process("vm", nats.url, root / "vm", host=HOST, libvirt_uri=uri,
                             accelerator="tcg", extra={
                                 "reconcile_s": 3600, "libvirt_dir": str(root / "libvirt"),
                                 "snapshot_dir": str(root / "vm" / "snapshots")}) as vm:
        h = Host(vm, storage, root)

        async def got(msg: Any) -> None:
            h.snapshot_events.append(decode(msg.data, VmSnapshotChanged))

        sub = await vm.bus.nc.subscribe(subjects.event(HOST, "vm", "snapshot") + ".*", cb=got)
        try:
            yield h
        finally:
            await sub.unsubscribe()


async def test_snapshot_of_a_running_vm_then_revert_gives_back_disk_nvram_tpm_and_spec(
        nats_server: NatsServer, tmp_path: Path, libvirt_test_uri: str) -> None:
    async with host(nats_server, tmp_path, libvirt_test_uri) as h:
        web = await h.vm_with_state("web", b"first marker", b"vars-1" * 100, b"tpm-1")
        disk = web.spec.disks[0].path
        await h.call("start", VmRef(vm="web"))

        snap = await h.call("snapshot_create", VmSnapshotCreate(vm="web", name="s1"))
        assert (snap.state, snap.method, snap.nvram, snap.tpm) == ("running", "copy", True, True)
        assert snap.disks == ["default/web-disk0"] and not snap.quiesced
        assert 0 < snap.paused_s < 5
        assert (await h.call("info", VmRef(vm="web"))).state == "running"  # resumed
        frozen = await h.call("snapshot_create", VmSnapshotCreate(vm="web", name="s2",
                                                                  quiesce=True))
        assert frozen.quiesced  # the test driver's guest agent answers a freeze
        await until("the snapshot events", lambda: len(h.snapshot_events) >= 2)
        assert [(e.snapshot, e.change, e.method) for e in h.snapshot_events[:2]] == [
            ("s1", "created", "copy"), ("s2", "created", "copy")]

        with pytest.raises(Conflict, match="has a snapshot 's1' already"):
            await h.call("snapshot_create", VmSnapshotCreate(vm="web", name="s1"))
        for bad in ("bad/name", "", ".hidden", "x" * 65, "a b"):
            with pytest.raises(InvalidName, match="snapshot name"):
                await h.call("snapshot_create", VmSnapshotCreate(vm="web", name=bad))

        # The guest changes its disk, NVRAM, TPM state; the operator changes its spec.
        write(Path(disk), b"second marker")
        await h.call("destroy", VmRef(vm="web"))
        await h.call("import_state", VmGuestState(uuid=web.uuid, nvram=b"vars-2",
                                                  tpm=tpm_state({"tpm2/permall": b"tpm-2"})))
        await h.call("update", VmUpdate(vm="web", memory_mib=96))
        await h.call("start", VmRef(vm="web"))
        with pytest.raises(Conflict, match="a revert needs it stopped.*--force"):
            await h.call("snapshot_revert", VmSnapshotRevert(vm="web", name="s1"))

        info = await h.call("snapshot_revert", VmSnapshotRevert(vm="web", name="s1", force=True))
        assert (info.state, info.memory_mib) == ("shutoff", 64)
        assert read(disk, 12) == b"first marker"
        assert (h.nvram("web"), h.tpm(web.uuid)) == (b"vars-1" * 100, b"tpm-1")
        assert info.spec.nics == web.spec.nics and info.uuid == web.uuid

        listed = await h.call("snapshot_list", VmSnapshotRef(vm="web"))
        assert [s.name for s in listed.snapshots] == ["s1", "s2"]
        ack = await h.call("snapshot_delete", VmSnapshotRef(vm="web", name="s2"))
        assert "deleted snapshot s2 of VM web" in ack.message
        with pytest.raises(NotFound, match="VM web has no snapshot 's2'"):
            await h.call("snapshot_delete", VmSnapshotRef(vm="web", name="s2"))
        await until("the revert and delete events", lambda: [
            e.change for e in h.snapshot_events] == ["created", "created", "reverted", "deleted"])


async def test_snapshot_refusals_and_the_snapshots_go_with_the_vm(
        nats_server: NatsServer, tmp_path: Path, libvirt_test_uri: str) -> None:
    async with host(nats_server, tmp_path, libvirt_test_uri) as h:
        web = await h.vm_with_state("web", b"w", b"v", b"t")
        db = await h.vm_with_state("db", b"d", b"v", b"t")
        await h.call("snapshot_create", VmSnapshotCreate(vm="db", name="db-snap"))
        with pytest.raises(NotFound, match="belongs to VM db, not to web"):
            await h.call("snapshot_revert", VmSnapshotRevert(vm="web", name="db-snap"))

        plain = tmp_path / "plain.raw"
        plain.write_bytes(bytes(MiB))
        await h.call("create", VmCreate(spec=VmSpec(name="plain", memory_mib=64,
                                                    disks=[Disk(path=str(plain))])))
        with pytest.raises(BadRequest, match="is a plain file, not a pool volume"):
            await h.call("snapshot_create", VmSnapshotCreate(vm="plain", name="s"))
        with pytest.raises(NotFound, match="no VM 'ghost'"):
            await h.call("snapshot_create", VmSnapshotCreate(vm="ghost", name="s"))

        # A migrating VM is not snapshotted; a VM with snapshots is not migrated.
        with h.vm.handlers.snapshots.migrating(web.uuid):
            with pytest.raises(Conflict, match="VM web is being migrated"):
                await h.call("snapshot_create", VmSnapshotCreate(vm="web", name="s"))
        with pytest.raises(Conflict, match=r"has 1 snapshot\(s\) \(db-snap\).*delete them"):
            await h.call("migrate", vm_api.VmMigrate(vm="db", to="h2"))

        await h.call("delete", VmDelete(vm="db", delete_disks=True))
        assert await h.snapshots(db.uuid) == []
        assert not (tmp_path / "storage" / "pools" / "default" / ".snapshots" / db.uuid).exists()


async def test_revert_stopped_halfway_is_finished_by_recovery_and_start_waits_for_it(
        nats_server: NatsServer, tmp_path: Path, libvirt_test_uri: str) -> None:
    async with host(nats_server, tmp_path, libvirt_test_uri) as h:
        web = await h.vm_with_state("web", b"before", b"vars-1", b"tpm-1")
        await h.call("snapshot_create", VmSnapshotCreate(vm="web", name="s1"))
        write(Path(web.spec.disks[0].path), b"after!")
        snaps = h.vm.handlers.snapshots
        # What an agent killed during a revert leaves: its note.
        note = snaps._note(web.uuid)
        note.parent.mkdir(parents=True, exist_ok=True)
        note.write_bytes(msgspec.json.encode(vmsnap._Revert(uuid=web.uuid, pool="default",
                                                            name="s1")))
        with pytest.raises(Conflict, match="being reverted to snapshot s1"):
            await h.call("start", VmRef(vm="web"))
        await snaps._recover()  # what begin() runs when the agent starts again
        assert not note.exists()
        assert read(web.spec.disks[0].path, 6) == b"before"
        assert (await h.call("start", VmRef(vm="web"))).state == "running"


async def test_backup_of_a_running_vm_restores_whole_and_bad_archives_are_refused(
        nats_server: NatsServer, tmp_path: Path, libvirt_test_uri: str) -> None:
    async with host(nats_server, tmp_path, libvirt_test_uri) as h:
        web = await h.vm_with_state("web", b"backed up", b"vars" * 1000, b"tpm-state")
        await h.call("start", VmRef(vm="web"))
        backups = tmp_path / "backups"
        backups.mkdir()
        done = await h.job("backup", VmBackup(vm="web", to=str(backups)))
        assert done.state == "succeeded", done.message
        path = Path(str(done.result["archive"]))
        assert path.parent == backups and path.name.startswith("web-")
        assert path.name.endswith(".phybak")
        assert (await h.call("info", VmRef(vm="web"))).state == "running"
        assert await h.snapshots(web.uuid) == []  # the backup's own snapshot is gone

        refused = await h.job("restore", VmRestore(archive=str(path)))
        assert refused.state == "failed" and "restore with --name NEW" in refused.message

        copy = await h.job("restore", VmRestore(archive=str(path), name="web2"))
        assert copy.state == "succeeded", copy.message
        web2 = await h.call("info", VmRef(vm="web2"))
        assert web2.uuid != web.uuid and web2.spec.nics[0].mac != web.spec.nics[0].mac
        assert web2.spec.disks[0].volume == "web2-disk0" and web2.spec.disks[0].owned
        assert read(web2.spec.disks[0].path, 9) == b"backed up"
        assert (h.nvram("web2"), h.tpm(web2.uuid)) == (b"vars" * 1000, b"tpm-state")

        before = (await h.volumes(), await h.snapshots())
        bad = {"flipped": _flipped(path.read_bytes()),
               "cut": path.read_bytes()[: path.stat().st_size // 2],
               "newer": _newer_format(),
               "not an archive": b"just some bytes"}
        for case, data in bad.items():
            (tmp_path / f"{case}.phybak").write_bytes(data)
            st = await h.job("restore", VmRestore(archive=str(tmp_path / f"{case}.phybak"),
                                                  name="web3"))
            assert st.state == "failed", case
            assert any(w in st.message for w in ("damaged", "cut short", "newer than",
                                                 "not valid", "not a Phyllome")), st.message
            assert (await h.volumes(), await h.snapshots()) == before, case
            with pytest.raises(NotFound):
                await h.call("info", VmRef(vm="web3"))
        assert "newer than the 1 this Phyllome reads" in (await h.job("restore", VmRestore(
            archive=str(tmp_path / "newer.phybak"), name="web3"))).message

        with pytest.raises(BadRequest, match="must be an absolute path"):
            await h.call("restore", VmRestore(archive="relative.phybak"))
        with pytest.raises(BadRequest, match="must be an absolute path"):
            await h.call("backup", VmBackup(vm="web", to="relative"))
        st = await h.job("backup", VmBackup(vm="web", to=str(tmp_path / "missing")))
        assert st.state == "failed" and "does not exist; create it first" in st.message

        # The original gone, the archive brings it back as itself.
        await h.call("delete", VmDelete(vm="web", force=True, delete_disks=True))
        itself = await h.job("restore", VmRestore(archive=str(path)))
        assert itself.state == "succeeded", itself.message
        back = await h.call("info", VmRef(vm="web"))
        assert (back.uuid, back.spec.nics) == (web.uuid, web.spec.nics)


def _flipped(data: bytes) -> bytes:
    bad = bytearray(data)
    bad[len(bad) // 2] ^= 0x40
    return bytes(bad)


def _newer_format() -> bytes:
    header = msgspec.json.encode({"type": "start", "format": archive.FORMAT + 1})
    plain = archive.MAGIC + len(header).to_bytes(4, "big") + header
    return zstandard.ZstdCompressor().compress(plain)


async def test_a_backup_into_a_full_directory_leaves_no_archive(
        nats_server: NatsServer, tmp_path: Path, libvirt_test_uri: str,
        small_ext4: Path) -> None:
    async with host(nats_server, tmp_path, libvirt_test_uri) as h:
        await h.vm_with_state("big", os.urandom(12 * MiB), b"v", b"t")
        vol = (await h.call("info", VmRef(vm="big"))).spec.disks[0].path
        with open(vol, "r+b") as f:  # 112 MiB of random data: more than the 64 MiB there
            f.truncate(128 * MiB)
            for i in range(7):
                f.seek((16 + 16 * i) * MiB)
                f.write(os.urandom(16 * MiB))
        st = await h.job("backup", VmBackup(vm="big", to=str(small_ext4)))
        assert st.state == "failed" and "ran out of space" in st.message
        assert [e for e in os.listdir(small_ext4) if e != "lost+found"] == []
        assert await h.snapshots() == []


async def test_scheduled_backups_run_once_after_downtime_and_keep_the_newest(
        nats_server: NatsServer, tmp_path: Path, libvirt_test_uri: str) -> None:
    async with host(nats_server, tmp_path, libvirt_test_uri) as h:
        await h.vm_with_state("web", b"w", b"v", b"t")
        backups = tmp_path / "backups"
        backups.mkdir()
        for every, keep, match in [(10, 1, "at most one a minute"), (3600, -1, "--keep -1")]:
            with pytest.raises(BadRequest, match=match):
                await h.call("schedule_backup", VmBackupSchedule(
                    vm="web", to=str(backups), every_s=every, keep=keep))
        listed = await h.call("schedule_backup", VmBackupSchedule(
            vm="web", to=str(backups), every_s=3600, keep=2))
        assert [(s.vm, s.keep) for s in listed.schedules] == [("web", 2)]
        await until("the first scheduled backup", lambda: len(os.listdir(backups)) == 1)
        snaps = h.vm.handlers.snapshots

        async def archives(n: int) -> bool:
            return len([e for e in os.listdir(backups) if not e.startswith(".")]) == n and \
                not [j for j in (await h.vm.jobs.jobs(Empty())).jobs if j.state == "running"]

        await until("the first backup job to end", lambda: archives(1))
        later = time.time() + 5 * 3600  # the agent was down for five periods
        assert len(await snaps.run_due(later)) == 1
        assert await snaps.run_due(later) == []  # made up once, not five times
        [s] = (await h.call("backup_schedules", Empty())).schedules
        assert s.next_run == pytest.approx(later + 3600)
        await until("the second backup", lambda: archives(2))
        assert len(await snaps.run_due(later + 3600)) == 1
        await until("the third backup, and the oldest pruned", lambda: archives(2))
        with pytest.raises(Conflict, match="has a backup schedule here"):
            await h.call("migrate", vm_api.VmMigrate(vm="web", to="h2"))
        listed = await h.call("schedule_backup", VmBackupSchedule(vm="web", every_s=0))
        assert listed.schedules == []
        with pytest.raises(NotFound, match="has no backup schedule"):
            await h.call("schedule_backup", VmBackupSchedule(vm="web", every_s=0))

