"""Snapshots, backups and restores of whole VMs, and their backup schedules.

The vm agent orchestrates; the storage agent (which owns the pools) copies. A snapshot holds
every disk of the VM (shared read-only media excepted) as a reflink, or a sparse copy where the
pool cannot share blocks (said in the reply: it is then not instant), the NVRAM file, the TPM
state and the spec. It lives in the pool of the VM's first disk (``services/storage/
snapshots.py``): it counts against that pool's room and goes when the VM is deleted. A VM with
snapshots (or a backup schedule) is not migrated: they stay with the host, so the migration
is refused until they are deleted.

Snapshot of a running VM: its filesystems are frozen through the guest agent when
``quiesce`` is asked and the agent answers, else its vCPUs are paused; the NVRAM and TPM state
are read and the disks copied while it is; then it goes on. The pause is as long as the
copies (milliseconds with reflinks) and is reported.

Revert (a stopped VM): a note ``<snapshot_dir>/reverts/<uuid>.json`` is written first; then
the storage agent puts the disk copies back (temporary copies renamed over the volumes, its
own crash story), the NVRAM and TPM state are replaced (temporary file, rename), the domain
is redefined from the snapshot's spec, and the note removed. An agent that stops on the way
finds the note when it starts and finishes the revert; the VM does not start until then.

Backup: a temporary snapshot (so a running VM keeps running), written by the storage agent
as one archive (``services/storage/archive.py``), then deleted. Restore: the archive is read
into a temporary snapshot (every sum checked first), its copies become the new VM's volumes,
then the VM is defined with its NVRAM and TPM state. Both are jobs. Scheduled backups
(``schedules.json`` beside the reverts) run as the same jobs; runs missed while the agent was
down run once when it is back::

    snaps = Snapshots(handlers)
    await snaps.create(VmSnapshotCreate(vm="web", name="before-upgrade"))
    await snaps.revert(VmSnapshotRevert(vm="web", name="before-upgrade", force=True))
    await snaps.schedule(VmBackupSchedule(vm="web", to="/backups", every_s=86400, keep=7))
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import re
import secrets
import time
import typing
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from services.vm.hypervisor import Domain
from services.vm.spec import check_name, check_spec, random_mac
from services.vm.state import STOPPED, with_secrets, without_secrets
from shared import fileops
from shared.errors import BadRequest, Conflict, InvalidName, NotFound, PhyError, Unavailable
from shared.jobs import Job
from shared.messages import Ack
from shared.messages import storage as storage_api
from shared.messages.jobs import JobAccepted, JobProgress
from shared.messages.storage import (
    TEMPORARY,
    ExportSnapshot,
    ImportSnapshot,
    RestoredVolumes,
    RestoreSnapshot,
    SnapshotContent,
    SnapshotInfo,
    SnapshotList,
    SnapshotQuery,
    SnapshotRef,
    TakeSnapshot,
    VolumeInfo,
    VolumeRef,
)
from shared.messages.vm import (
    BackupSchedule,
    BackupScheduleList,
    Disk,
    VmBackup,
    VmBackupSchedule,
    VmInfo,
    VmRef,
    VmRestore,
    VmSnapshot,
    VmSnapshotChanged,
    VmSnapshotCreate,
    VmSnapshotList,
    VmSnapshotRef,
    VmSnapshotRevert,
    VmSpec,
    VmState,
)

if TYPE_CHECKING:
    from services.vm.handlers import Handlers

log = logging.getLogger("phyllome.vm.snapshots")

COPY_TIMEOUT_S = 3600.0  # a sparse copy of big disks; a reflink answers in milliseconds
CALL_TIMEOUT_S = 30.0
STOP_WAIT_S = 60.0
MIN_EVERY_S = 60.0
RETRY_S = 5.0
SPEC_FILE, NVRAM_FILE, TPM_FILE = "vm.json", "nvram.fd", "tpm.tar.gz"
STAGED = "restore"  # the temporary snapshot a restore reads an archive into
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
_STATES = frozenset(typing.get_args(VmState))


def check_snapshot_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidName(f"snapshot name {name!r} is not valid: use 1-64 letters, digits, "
                          "'-', '_', '.' or '+', starting with a letter or digit")
    return name


def copied_disks(spec: VmSpec) -> tuple[str, list[Disk]]:
    """(the pool a snapshot of ``spec`` lives in, the disks it copies): every disk but shared
    read-only media, each of which must be a pool volume."""
    disks = [d for d in spec.disks if d.owned or not d.readonly]
    for d in disks:
        if not d.volume:
            raise BadRequest(f"disk {d.path} of VM {spec.name} is a plain file, not a pool "
                             "volume: snapshots and backups live in pools; import it with "
                             "`phyllome storage import` first")
    if not disks:
        raise BadRequest(f"VM {spec.name} has no disk in a storage pool; a snapshot lives in "
                         "the pool of its first disk")
    return disks[0].pool or "default", disks


def next_run(s: BackupSchedule, now: float) -> float:
    """When a schedule runs after a run at ``now``: one period after the run that was due,
    or, when that is past too (the agent was down), one period from now, so runs missed
    during downtime are made up once, not once each."""
    due = s.next_run + s.every_s
    return due if due > now else now + s.every_s


def due(schedules: list[BackupSchedule], now: float) -> list[BackupSchedule]:
    return [s for s in schedules if s.next_run <= now]


def _view(info: SnapshotInfo, paused_s: float = 0.0) -> VmSnapshot:
    methods = {d.method for d in info.disks}
    method: Any = "none" if not methods else methods.pop() if len(methods) == 1 else "mixed"
    state = info.labels.get("state", "shutoff")
    return VmSnapshot(
        vm=info.labels.get("vm", ""), uuid=info.owner, name=info.name, created=info.created,
        pool=info.pool, state=state if state in _STATES else "unknown",  # type: ignore[arg-type]
        disks=[f"{d.pool}/{d.volume}" for d in info.disks], method=method,
        allocated_bytes=info.allocated_bytes, nvram=NVRAM_FILE in info.files,
        tpm=TPM_FILE in info.files, quiesced=info.labels.get("quiesced") == "yes",
        paused_s=round(paused_s, 6), seconds=info.seconds)


class _Revert(msgspec.Struct, frozen=True):
    """The note of a revert under way (see the module docstring)."""

    uuid: str
    pool: str
    name: str


class Snapshots:
    """The snapshot, backup and restore endpoints of one vm agent; see the module docstring."""

    def __init__(self, handlers: Handlers) -> None:
        self.h = handlers
        self.agent = handlers.agent
        self.host = handlers.host
        self.hv = handlers.hv
        self.dir = Path(handlers.settings.snapshot_dir)
        self.busy: dict[str, str] = {}  # uuid -> what is being done to its snapshots
        self.moving: set[str] = set()  # uuids being migrated away
        self._wake = asyncio.Event()

    async def begin(self) -> None:
        """Finish reverts the agent stopped in, clean up, and run the schedules."""
        self.agent.spawn(self._recover(), "snapshot-recovery")
        self.agent.spawn(self._run_schedules(), "backup-schedules")

    # -- who may touch a VM's snapshots now --------------------------------------------------

    def _refuse_busy(self, dom: Domain, doing: str) -> None:
        if dom.uuid in self.moving:
            raise Conflict(f"VM {dom.name} is being migrated (wanted: {doing}); do it where "
                           "it lands, once the migration is done")
        if dom.uuid in self.busy:
            raise Conflict(f"VM {dom.name} is busy ({self.busy[dom.uuid]}); try again when "
                           "that is done")

    @contextlib.contextmanager
    def _claim(self, dom: Domain, doing: str) -> Iterator[None]:
        """Mark the VM's snapshots as being changed by ``doing``; a second change is refused."""
        self._refuse_busy(dom, doing)
        self.busy[dom.uuid] = doing
        try:
            yield
        finally:
            self.busy.pop(dom.uuid, None)

    @contextlib.contextmanager
    def migrating(self, uuid: str) -> Iterator[None]:
        """Held by a migration job: no snapshot is taken of a VM that is leaving."""
        self.moving.add(uuid)
        try:
            yield
        finally:
            self.moving.discard(uuid)

    async def refuse_migration(self, dom: Domain) -> None:
        """A VM with snapshots or a backup schedule stays: they would not move with it."""
        if dom.uuid in self.busy:
            raise Conflict(f"VM {dom.name} is busy ({self.busy[dom.uuid]}); migrate it when "
                           "that is done")
        if dom.uuid in self._schedules():
            raise Conflict(f"VM {dom.name} has a backup schedule here, which would not move "
                           f"with it: remove it (`phyllome vm backup {dom.name} --every off`) "
                           "before migrating")
        spec = await self._spec(dom)
        if not any(d.volume for d in spec.disks):
            return
        names = [s.name for s in await self._list(dom, spec)]
        if names:
            raise Conflict(f"VM {dom.name} has {len(names)} snapshot(s) ({', '.join(names)}), "
                           "which do not move with it: delete them (`phyllome vm snapshot "
                           f"delete {dom.name} NAME`) before migrating, or back it up and "
                           "restore it on the other host")

    async def _spec(self, dom: Domain) -> VmSpec:
        record, _ = await self.h.states.load(dom.uuid)
        spec = record.spec if record else dom.spec
        if spec is None:
            raise NotFound(f"VM {dom.name} was not made by Phyllome; it has no spec")
        return spec

    # -- snapshots ---------------------------------------------------------------------------

    async def create(self, req: VmSnapshotCreate) -> VmSnapshot:
        name = check_snapshot_name(req.name)
        dom = await self.hv.domain(req.vm)
        spec = await self._spec(dom)
        with self._claim(dom, f"taking snapshot {name}"):
            snap = await self._take(dom, spec, name, quiesce=req.quiesce, labels={})
        await self._event(dom, snap.name, "created", method=snap.method, paused_s=snap.paused_s)
        log.info("snapshot %s of VM %s: %s, paused %.3f s", name, dom.name, snap.method,
                 snap.paused_s)
        return snap

    async def _take(self, dom: Domain, spec: VmSpec, name: str, *, quiesce: bool,
                    labels: dict[str, str]) -> VmSnapshot:
        """Freeze or pause a running guest, read its NVRAM and TPM state, let the storage
        agent copy the disks, then let the guest go on."""
        pool, disks = copied_disks(spec)
        frozen = paused = False
        if dom.state in ("running", "blocked"):
            if quiesce and spec.guest_agent:
                frozen = await self.hv.freeze(dom.uuid)
            if not frozen:
                await self.hv.suspend(dom.uuid)
                paused = True
        held = time.monotonic()
        try:
            nvram, tpm = await self.hv.export_state(dom.uuid)
            files = {SPEC_FILE: msgspec.json.encode(without_secrets(spec))}
            if nvram:
                files[NVRAM_FILE] = nvram
            if tpm:
                files[TPM_FILE] = tpm
            info: SnapshotInfo = await self.agent.bus.call(
                self.host, storage_api.SNAPSHOT, TakeSnapshot(
                    pool=pool, owner=dom.uuid, name=name, files=files,
                    disks=[VolumeRef(pool=d.pool or "default", name=d.volume) for d in disks],
                    labels={"vm": spec.name, "state": dom.state,
                            "quiesced": "yes" if frozen else "no", **labels}),
                timeout=COPY_TIMEOUT_S)
        finally:
            if frozen:
                await self.hv.thaw(dom.uuid)
            elif paused:
                await self.hv.resume(dom.uuid)
        return _view(info, time.monotonic() - held if frozen or paused else 0.0)

    async def _list(self, dom: Domain, spec: VmSpec) -> list[SnapshotInfo]:
        pool, _ = copied_disks(spec)
        found: SnapshotList = await self.agent.bus.call(
            self.host, storage_api.SNAPSHOTS, SnapshotQuery(pool=pool, owner=dom.uuid),
            timeout=CALL_TIMEOUT_S)
        return found.snapshots

    async def listing(self, req: VmSnapshotRef) -> VmSnapshotList:
        dom = await self.hv.domain(req.vm)
        spec = await self._spec(dom)
        if not any(d.volume for d in spec.disks):
            return VmSnapshotList(snapshots=[])
        return VmSnapshotList(snapshots=[_view(i) for i in await self._list(dom, spec)
                                         if not req.name or i.name == req.name])

    async def _find(self, dom: Domain, spec: VmSpec, name: str) -> SnapshotInfo:
        """The VM's snapshot ``name``; NotFound says whose it is when another VM has one."""
        check_snapshot_name(name)
        for info in await self._list(dom, spec):
            if info.name == name:
                return info
        found: SnapshotList = await self.agent.bus.call(
            self.host, storage_api.SNAPSHOTS, SnapshotQuery(), timeout=CALL_TIMEOUT_S)
        others = [i for i in found.snapshots if i.name == name and i.owner != dom.uuid]
        if others:
            whose = others[0].labels.get("vm") or others[0].owner
            raise NotFound(f"snapshot {name!r} belongs to VM {whose}, not to {dom.name}: a VM "
                           f"is reverted to its own snapshots only (`phyllome vm snapshot list "
                           f"{dom.name}`)")
        raise NotFound(f"VM {dom.name} has no snapshot {name!r}; see `phyllome vm snapshot "
                       f"list {dom.name}`")

    async def delete(self, req: VmSnapshotRef) -> Ack:
        dom = await self.hv.domain(req.vm)
        spec = await self._spec(dom)
        if not req.name:
            raise BadRequest("name the snapshot to delete")
        info = await self._find(dom, spec, req.name)
        with self._claim(dom, f"deleting snapshot {info.name}"):
            await self.agent.bus.call(self.host, storage_api.SNAPSHOT_DELETE, SnapshotRef(
                pool=info.pool, owner=dom.uuid, name=info.name), timeout=CALL_TIMEOUT_S)
        await self._event(dom, info.name, "deleted")
        return Ack(message=f"deleted snapshot {info.name} of VM {dom.name}")

    async def forget(self, dom: Domain, spec: VmSpec | None) -> None:
        """The VM is being deleted: its snapshots and schedule go with it."""
        self._save({k: v for k, v in self._schedules().items() if k != dom.uuid})
        if spec is None or not any(d.volume for d in spec.disks):
            return
        pool, _ = copied_disks(spec)
        try:
            await self.agent.bus.call(self.host, storage_api.SNAPSHOT_DELETE, SnapshotRef(
                pool=pool, owner=dom.uuid), timeout=CALL_TIMEOUT_S)
        except Unavailable as e:
            raise Unavailable(f"VM {dom.name}'s snapshots are deleted with it, and the storage "
                              f"agent does not answer ({e.message}); start it and try again") \
                from None

    # -- revert ------------------------------------------------------------------------------

    def _note(self, uuid: str) -> Path:
        return self.dir / "reverts" / f"{uuid}.json"

    def unfinished(self, uuid: str) -> str:
        """The snapshot a stopped-halfway revert of the VM goes back to, or ""."""
        try:
            return msgspec.json.decode(self._note(uuid).read_bytes(), type=_Revert).name
        except (FileNotFoundError, msgspec.DecodeError):
            return ""

    async def revert(self, req: VmSnapshotRevert) -> VmInfo:
        dom = await self.hv.domain(req.vm)
        spec = await self._spec(dom)
        info = await self._find(dom, spec, req.name)
        with self._claim(dom, f"reverting to snapshot {info.name}"):
            if dom.state not in STOPPED:
                if not req.force:
                    raise Conflict(f"VM {dom.name} is {dom.state}: a revert needs it stopped; "
                                   "stop it first, or revert with --force")
                await self.hv.destroy(dom.uuid)
                dom = await self.h.states.wait_state(dom.uuid, STOPPED, STOP_WAIT_S)
                await self._recorded_stopped(dom)
            note = _Revert(uuid=dom.uuid, pool=info.pool, name=info.name)
            path = self._note(dom.uuid)
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            await asyncio.to_thread(fileops.write_atomic, path, msgspec.json.encode(note))
            await self._apply(note)
            path.unlink()
        await self._event(dom, info.name, "reverted")
        return await self.h.info(VmRef(vm=dom.uuid))

    async def _recorded_stopped(self, dom: Domain) -> None:
        """Wait until KV ``vms`` says the VM stopped: the storage agent reads it there, and
        refuses to put disks back under a VM it thinks runs."""
        deadline = time.monotonic() + STOP_WAIT_S
        while True:
            record, _ = await self.h.states.load(dom.uuid)
            if record is None or record.state in STOPPED:
                return
            if time.monotonic() > deadline:
                raise Conflict(f"VM {dom.name} stopped, and its record still says "
                               f"{record.state}; try the revert again")
            await asyncio.sleep(0.05)

    async def _apply(self, note: _Revert) -> None:
        """Disks, NVRAM, TPM state and spec from the snapshot; each step can run again."""
        content: SnapshotContent = await self.agent.bus.call(
            self.host, storage_api.SNAPSHOT_READ, SnapshotRef(
                pool=note.pool, owner=note.uuid, name=note.name), timeout=CALL_TIMEOUT_S)
        await self.agent.bus.call(self.host, storage_api.SNAPSHOT_RESTORE, RestoreSnapshot(
            pool=note.pool, owner=note.uuid, name=note.name), timeout=COPY_TIMEOUT_S)
        files = content.files
        old = await self.hv.domain(note.uuid)
        spec = with_secrets(msgspec.json.decode(files[SPEC_FILE], type=VmSpec),
                            await self.hv.spec(note.uuid))
        record, _ = await self.h.states.load(note.uuid)
        dom = await self.h._define(spec)
        if NVRAM_FILE not in files or TPM_FILE not in files:
            await self.hv.drop_state(dom.uuid)
        await self.hv.import_state(dom.uuid, files.get(NVRAM_FILE, b""),
                                   files.get(TPM_FILE, b""))
        if spec.autostart != old.autostart:
            await self.hv.set_autostart(dom.uuid, spec.autostart)
        await self.h.states.write(spec, dom, revision=(record.revision if record else 1) + 1)

    async def _recover(self) -> None:
        """Finish the reverts the agent stopped in and remove the temporary snapshots its
        jobs left; retried while the storage agent does not answer."""
        while True:
            try:
                for path in sorted((self.dir / "reverts").glob("*.json")):
                    note = msgspec.json.decode(path.read_bytes(), type=_Revert)
                    log.warning("finishing the revert of %s to snapshot %s", note.uuid,
                                note.name)
                    await self._apply(note)
                    path.unlink()
                found: SnapshotList = await self.agent.bus.call(
                    self.host, storage_api.SNAPSHOTS, SnapshotQuery(), timeout=CALL_TIMEOUT_S)
                mine = {d.uuid for d in await self.hv.domains()}
                for info in found.snapshots:
                    if info.owner in mine and info.labels.get(TEMPORARY) == "yes" and \
                            info.owner not in self.busy:
                        await self.agent.bus.call(self.host, storage_api.SNAPSHOT_DELETE,
                                                  SnapshotRef(pool=info.pool, owner=info.owner,
                                                              name=info.name),
                                                  timeout=CALL_TIMEOUT_S)
                return
            except Unavailable as e:
                log.info("snapshot recovery waits for the storage agent: %s", e.message)
            except (PhyError, msgspec.DecodeError) as e:
                log.error("snapshot recovery failed: %s", e)
                return
            await asyncio.sleep(RETRY_S)

    async def _event(self, dom: Domain, snapshot: str, change: Any, method: str = "",
                     paused_s: float = 0.0) -> None:
        await self.agent.publish("snapshot", VmSnapshotChanged(
            host=self.host, uuid=dom.uuid, vm=dom.name, snapshot=snapshot, change=change,
            method=method, paused_s=paused_s), dom.uuid)

    # -- backups -----------------------------------------------------------------------------

    async def backup(self, req: VmBackup) -> JobAccepted:
        dom = await self.hv.domain(req.vm)
        spec = await self._spec(dom)
        copied_disks(spec)
        _check_dir(req.to)
        self._refuse_busy(dom, "back it up")
        return self._start_backup(dom, req.to, 0, quiesce=req.quiesce)

    def _start_backup(self, dom: Domain, to: str, keep: int, *, quiesce: bool) -> JobAccepted:
        async def work(job: Job) -> dict[str, object]:
            with self.h.metrics.operation("backup"):
                return await self._backup(job, dom.uuid, to, keep, quiesce=quiesce)

        return self.agent.jobs.start("backup", work, key=f"backup:{dom.uuid}")

    async def _backup(self, job: Job, uuid: str, to: str, keep: int, *,
                      quiesce: bool) -> dict[str, object]:
        dom = await self.hv.domain(uuid)
        spec = await self._spec(dom)
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
        name = f"backup-{stamp}-{secrets.token_hex(2)}"
        with self._claim(dom, "a backup"):
            await job.progress(0, 1, "taking a snapshot")
            snap = await self._take(dom, spec, name, quiesce=quiesce, labels={TEMPORARY: "yes"})
            try:
                accepted = await self.agent.bus.call(
                    self.host, storage_api.SNAPSHOT_EXPORT, ExportSnapshot(
                        pool=snap.pool, owner=dom.uuid, name=name, dir=to,
                        prefix=f"{spec.name}-", keep=keep), timeout=CALL_TIMEOUT_S)

                async def relay(status: JobProgress) -> None:
                    await job.progress(status.done, status.total, "writing the archive")

                status = await self.h._wait_job(accepted, relay)
            finally:
                with contextlib.suppress(PhyError):
                    await self.agent.bus.call(self.host, storage_api.SNAPSHOT_DELETE,
                                              SnapshotRef(pool=snap.pool, owner=dom.uuid,
                                                          name=name), timeout=CALL_TIMEOUT_S)
        log.info("backed up VM %s to %s", dom.name, status.result.get("archive"))
        return {**status.result, "vm": dom.name, "method": snap.method,
                "paused_s": snap.paused_s}

    async def restore(self, req: VmRestore) -> JobAccepted:
        if not req.archive.startswith("/"):
            raise BadRequest(f"archive {req.archive!r} must be an absolute path on {self.host}")
        if req.name:
            with contextlib.suppress(NotFound):
                dom = await self.hv.domain(check_name(req.name))
                raise Conflict(f"a VM named {req.name} exists already on {self.host} "
                               f"({dom.state}); choose another name")
        staging = str(uuidlib.uuid4())

        async def work(job: Job) -> dict[str, object]:
            with self.h.metrics.operation("restore"):
                return await self._restore(job, req, staging)

        return self.agent.jobs.start("restore", work, key=f"restore:{req.archive}:{req.name}")

    async def _restore(self, job: Job, req: VmRestore, staging: str) -> dict[str, object]:
        bus = self.agent.bus
        await job.progress(0, 1, "reading and checking the archive")
        accepted = await bus.call(self.host, storage_api.SNAPSHOT_IMPORT, ImportSnapshot(
            archive=req.archive, pool=req.pool, owner=staging, name=STAGED,
            labels={TEMPORARY: "yes"}), timeout=CALL_TIMEOUT_S)

        async def relay(status: JobProgress) -> None:
            await job.progress(status.done, status.total, "reading and checking the archive")

        await self.h._wait_job(accepted, relay)
        made: list[VolumeRef] = []
        defined = ""
        try:
            content: SnapshotContent = await bus.call(
                self.host, storage_api.SNAPSHOT_READ, SnapshotRef(
                    pool=req.pool, owner=staging, name=STAGED), timeout=CALL_TIMEOUT_S)
            spec = await self._restored_spec(content, req)
            _, disks = copied_disks(spec)
            targets = [VolumeRef(pool=req.pool, name=f"{spec.name}-disk{i}")
                       for i in range(len(disks))]
            await job.progress(1, 2, "making the disks")
            restored: RestoredVolumes = await bus.call(
                self.host, storage_api.SNAPSHOT_RESTORE, RestoreSnapshot(
                    pool=req.pool, owner=staging, name=STAGED, targets=targets, move=True),
                timeout=COPY_TIMEOUT_S)
            made = targets
            new = iter(restored.volumes)
            spec = msgspec.structs.replace(spec, disks=[
                _volume(d, next(new)) if d in disks else d for d in spec.disks])
            check_spec(spec)
            await job.progress(2, 3, f"defining {spec.name}")
            dom = await self.h._define(spec)
            defined = dom.uuid
            files = content.files
            await self.hv.import_state(dom.uuid, files.get(NVRAM_FILE, b""),
                                       files.get(TPM_FILE, b""))
            if spec.autostart:
                await self.hv.set_autostart(dom.uuid, True)
            await self.h.states.write(spec, dom)
        except BaseException:
            if defined:
                await self.hv.undefine(defined)
                await self.h.states.gone(defined, "", "undefined", "restore-failed")
            for ref in made:
                with contextlib.suppress(PhyError):
                    await bus.call(self.host, storage_api.DELETE, ref, timeout=CALL_TIMEOUT_S)
            with contextlib.suppress(PhyError):
                await bus.call(self.host, storage_api.SNAPSHOT_DELETE, SnapshotRef(
                    pool=req.pool, owner=staging), timeout=CALL_TIMEOUT_S)
            raise
        await job.progress(3, 3, "done")
        log.info("restored VM %s (%s) from %s", spec.name, spec.uuid, req.archive)
        return {"name": spec.name, "uuid": spec.uuid, "from": req.archive,
                "disks": [f"{v.pool}/{v.name}" for v in restored.volumes]}

    async def _restored_spec(self, content: SnapshotContent, req: VmRestore) -> VmSpec:
        """The archived VM as it comes back: itself, or with ``req.name`` a copy (new uuid
        and MACs); refused when the VM itself still exists anywhere in the cluster."""
        try:
            spec = msgspec.json.decode(content.files[SPEC_FILE], type=VmSpec)
        except (KeyError, msgspec.DecodeError):
            raise BadRequest("the archive holds no VM spec: it is not a VM backup") from None
        if req.name:
            spec = msgspec.structs.replace(
                spec, name=req.name, uuid=str(uuidlib.uuid4()), autostart=False,
                nics=[msgspec.structs.replace(n, mac=random_mac()) for n in spec.nics])
        else:
            for rec in await self.h.states.records():
                if rec.spec.uuid == spec.uuid:
                    raise Conflict(f"VM {rec.spec.name} ({spec.uuid}) exists on host "
                                   f"{rec.host}; restore with --name NEW to make a copy, or "
                                   "delete it first")
        await self.h._refuse_duplicate(spec)
        return spec

    # -- schedules ---------------------------------------------------------------------------

    def _schedules(self) -> dict[str, BackupSchedule]:
        try:
            data = (self.dir / "schedules.json").read_bytes()
        except FileNotFoundError:
            return {}
        return {s.uuid: s for s in msgspec.json.decode(data, type=list[BackupSchedule])}

    def _save(self, schedules: dict[str, BackupSchedule]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fileops.write_atomic(self.dir / "schedules.json", msgspec.json.encode(
            sorted(schedules.values(), key=lambda s: s.vm)))

    async def schedule(self, req: VmBackupSchedule) -> BackupScheduleList:
        dom = await self.hv.domain(req.vm)
        schedules = self._schedules()
        if req.every_s == 0:
            if schedules.pop(dom.uuid, None) is None:
                raise NotFound(f"VM {dom.name} has no backup schedule")
        else:
            if req.every_s < MIN_EVERY_S:
                raise BadRequest(f"backups every {req.every_s:g} s: at most one a minute "
                                 f"(--every 1h, 1d, ...)")
            if req.keep < 0:
                raise BadRequest(f"--keep {req.keep}: keep 0 (all) or more archives")
            copied_disks(await self._spec(dom))
            _check_dir(req.to)
            schedules[dom.uuid] = BackupSchedule(
                uuid=dom.uuid, vm=dom.name, to=req.to, every_s=req.every_s, keep=req.keep,
                next_run=time.time())
        self._save(schedules)
        self._wake.set()
        return await self.schedules()

    async def schedules(self) -> BackupScheduleList:
        return BackupScheduleList(schedules=sorted(self._schedules().values(),
                                                   key=lambda s: s.vm))

    async def run_due(self, now: float) -> list[JobAccepted]:
        """Start the backup jobs that are due (once each, however late); returns them."""
        schedules = self._schedules()
        started = []
        for s in due(list(schedules.values()), now):
            try:
                dom = await self.hv.domain(s.uuid)
            except NotFound:
                log.info("VM %s is gone; its backup schedule is removed", s.vm)
                schedules.pop(s.uuid)
                continue
            accepted = self._start_backup(dom, s.to, s.keep, quiesce=False)
            started.append(accepted)
            schedules[s.uuid] = msgspec.structs.replace(
                s, last_run=now, last_job=accepted.job_id, next_run=next_run(s, now))
        if started or len(schedules) != len(self._schedules()):
            self._save(schedules)
        return started

    async def _run_schedules(self) -> None:
        while True:
            try:
                await self.run_due(time.time())
            except PhyError as e:
                log.warning("scheduled backups not started: %s", e.message)
            upcoming = [s.next_run for s in self._schedules().values()]
            wait = min([max(0.0, t - time.time()) for t in upcoming] + [MIN_EVERY_S])
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)


def _volume(disk: Disk, vol: VolumeInfo) -> Disk:
    """``disk`` as the restored volume ``vol``, which the VM owns."""
    return msgspec.structs.replace(disk, path=vol.path, pool=vol.pool, volume=vol.name,
                                   owned=True)


def _check_dir(path: str) -> None:
    if not isinstance(path, str) or not path.startswith("/") or "\x00" in path:
        raise BadRequest(f"backup directory {path!r} must be an absolute path on the VM's host")
