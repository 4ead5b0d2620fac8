"""Cold migration of a stopped VM to another host: a job of the source host's vm agent.

Run only by the vm agent (its ``migrate`` endpoint); everything it asks of either host goes
through the agents' bus contracts, and the VM's ownership through its KV record::

    migrations = Migrations(agent, states, Path(settings.migration_dir))
    await migrations.recover()  # at start: finish or roll back what a crash left
    accepted = agent.jobs.start("migrate", lambda job: migrations.migrate(req, job))

Ownership. The VM's record in KV ``vms`` names its owner host, and only the owner starts,
changes or deletes it (``services.vm.state``). The job first locks the record (a
compare-and-set that also checks the VM is shut off), so that neither host starts the VM
while it moves; once the target's copy is verified it hands the record to the target in one
compare-and-set (the commit), and only then does the source remove its own copy. A crash
can leave a second definition for a while, never a second owner, and never a VM running on
a host that does not own it.

Steps, each one a job progress event on ``phy.evt.<source>.vm.job.<id>``:

1. the VM must be shut off (with ``shutdown``: ACPI shutdown first, forced after a wait);
   its record is locked;
2. preflight on the target: up, vm and storage agents there, memory / pool space /
   firmware / swtpm / GPUs (``shared.placement.refusal``), no VM or volume of that name or
   uuid, every disk a pool volume; the source disks' sha256;
3. every disk streamed by the storage agents (``storage.send``: resumable, checksummed);
4. the domain defined on the target (same uuid, MACs, spec; paths from the target pools);
   NVRAM and TPM state carried over (``vm.export_state`` -> ``vm.import_state``);
5. the target's copy of every disk checked against the source's sha256 and its definition
   read back; then the commit (its KV reads and compare-and-set wait out, for up to
   ``ELECTION_WAIT_S``, a KV stream electing a leader after a server or a link came back);
6. the source undefines the VM and deletes every disk it moved, owned or given to the VM
   (``keep_source`` keeps them; a volume that another VM of the source uses stays too):
   the reply lists what was removed from the source and what was kept there.

A failure before the commit rolls back what was made on the target (the VM, the received
volumes) and unlocks the record, so the VM stays whole on the source only; the job fails
with a message that says at which step and why, and can be run again.

Crashes. The job keeps a journal in the vm agent's state directory (``<uuid>.json``,
rewritten temp-then-rename at each step). A vm agent that restarts reads it: a migration
that had not committed is rolled back, one that had is finished (the source's copy
removed), and the old job's outcome event is published then. A crash of the target's vm
agent fails the job at the next call to it, which rolls back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import msgspec

from services.vm import hostfs
from services.vm.state import VmStates
from shared import contracts, subjects
from shared.agent import Agent
from shared.bus import Bus
from shared.cluster import cluster_vms, host_views_on
from shared.errors import (
    BackendError,
    BadRequest,
    Conflict,
    InsufficientResources,
    InvalidName,
    NotFound,
    PhyError,
    Unavailable,
)
from shared.jobs import succeeded, wait_job
from shared.messages import Empty
from shared.messages import net as net_api
from shared.messages import storage as storage_api
from shared.messages import vm as vm_api
from shared.messages.jobs import JobFinished, JobProgress, JobRef, JobState
from shared.messages.storage import SendVolume, VolumeInfo, VolumeQuery, VolumeRef
from shared.messages.vm import (
    MigrationLock,
    VmCreate,
    VmDelete,
    VmInfo,
    VmMigrate,
    VmRef,
    VmShutdown,
    VmSpec,
)
from shared.placement import committed_mib, needs, refusal

log = logging.getLogger("phyllome.migration")
T = TypeVar("T")

CALL_TIMEOUT_S = 15.0
SHA_TIMEOUT_S = 600.0
SHUTDOWN_WAIT_S = 120.0
TRANSFER_TIMEOUT_S = 24 * 3600.0
RECOVERY_BACKOFF_MAX_S = 30.0
ELECTION_WAIT_S = 60.0  # how long the commit waits out a KV stream electing a leader
# Crash tests only: at this step ("sent", "defined" or "committed") the job writes
# ``<uuid>.paused`` beside its journal and waits until that file is removed.
PAUSE_ENV = "PHYLLOME_VM_MIGRATION_PAUSE"

Step = Literal["locked", "sending", "defining", "verifying", "committing", "committed"]


class Job(Protocol):
    """What the migration needs of its job (``shared.jobs.Job`` is one)."""

    id: str
    kind: str

    async def progress(self, done: int, total: int, message: str = "", *,
                       now: bool = False) -> None: ...


class Entry(msgspec.Struct, frozen=True, kw_only=True):
    """One migration in the journal: what it has made so far, to undo or finish it."""

    job_id: str
    uuid: str
    name: str
    source: str
    target: str
    step: Step = "locked"
    sending: str = ""  # the storage send job running on the source
    volumes: list[VolumeRef] = []  # made on the target
    defined: bool = False  # asked the target to define the VM (it may have)
    remove: list[VolumeRef] = []  # what the source deletes once committed


class Journal:
    """The migrations this vm agent runs, one JSON file per VM, each rewritten
    temp-then-rename so that a crash leaves the last whole step."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, uuid: str) -> Path:
        return self.directory / f"{subjects.token(uuid, 'uuid')}.json"

    def save(self, entry: Entry) -> Entry:
        hostfs.write_atomically(self.path(entry.uuid), msgspec.json.encode(entry))
        return entry

    def entries(self) -> list[Entry]:
        out = []
        for data in hostfs.read_all(self.directory, ".json"):
            try:
                out.append(msgspec.json.decode(data, type=Entry))
            except msgspec.MsgspecError as e:
                log.error("ignoring an unreadable migration journal entry: %s", e)
        return out

    def remove(self, uuid: str) -> None:
        hostfs.remove(str(self.path(uuid)))


class _Step:
    """Progress in steps of the whole migration: preflight, one per disk, define, verify,
    clean up. Each step is one job progress event, published at once (not throttled)."""

    def __init__(self, job: Job, disks: int) -> None:
        self.job = job
        self.total = disks + 4
        self.done = 0

    async def __call__(self, message: str, advance: bool = True) -> None:
        log.info("migration: %s", message)
        await self.job.progress(self.done, self.total, message, now=True)
        if advance:
            self.done += 1


class Migrations:
    """The migrations of one vm agent: started as jobs, journaled, settled after a crash."""

    def __init__(self, agent: Agent, states: VmStates, journal_dir: Path) -> None:
        self.agent = agent
        self.bus: Bus = agent.bus
        self.host = agent.host
        self.states = states
        self.journal = Journal(journal_dir)

    async def migrate(self, req: VmMigrate, job: Job) -> dict[str, object]:
        """The migration job (see the module doc); returns what moved where."""
        bus, source = self.bus, self.host
        target = subjects.token(req.to, "target host")
        if target == source:
            raise BadRequest(f"VM {req.vm} is on {source} already; give another host with --to")
        info: VmInfo = await bus.call(source, vm_api.INFO, VmRef(vm=req.vm),
                                      timeout=CALL_TIMEOUT_S)
        spec = info.spec
        step = _Step(job, len(spec.disks))

        # 1. shut off, then locked
        if info.state not in ("shutoff", "crashed"):
            if not req.shutdown:
                raise Conflict(f"VM {info.name} is {info.state}: cold migration needs it shut "
                               "off; stop it first, or migrate with --shutdown")
            await step(f"shutting {info.name} down", advance=False)
            info = await bus.call(source, vm_api.SHUTDOWN, VmShutdown(
                vm=spec.uuid, timeout_s=SHUTDOWN_WAIT_S, force=True),
                timeout=SHUTDOWN_WAIT_S + CALL_TIMEOUT_S)
        record = await self.states.lock(spec.uuid, MigrationLock(
            job_id=job.id, source=source, target=target, since=time.time()))
        entry = self.journal.save(Entry(job_id=job.id, uuid=spec.uuid, name=spec.name,
                                        source=source, target=target))
        try:
            # 2. preflight
            await step(f"preflight on {target}")
            digests = await _preflight(bus, source, target, spec)

            # 3. disks
            for i, disk in enumerate(spec.disks):
                label = f"disk {i + 1}/{len(spec.disks)} ({disk.pool}/{disk.volume})"
                await step(f"sending {label} to {target}", advance=False)
                accepted = await bus.call(source, storage_api.SEND, SendVolume(
                    pool=disk.pool, name=disk.volume, to_host=target, dst_pool=disk.pool,
                    bwlimit_bytes_s=req.bwlimit_bytes_s), timeout=CALL_TIMEOUT_S)
                entry = self.journal.save(msgspec.structs.replace(
                    entry, step="sending", sending=accepted.job_id, volumes=[
                        *entry.volumes, VolumeRef(pool=disk.pool, name=disk.volume)]))

                async def forward(sent: JobProgress, label: str = label) -> None:
                    pct = f" {100 * sent.done // sent.total}%" if sent.total else ""
                    await job.progress(step.done, step.total, f"sending {label}{pct}")

                succeeded(await wait_job(bus, source, "storage", accepted,
                                         timeout=TRANSFER_TIMEOUT_S, on_progress=forward))
                entry = self.journal.save(msgspec.structs.replace(entry, sending=""))
                step.done += 1
            await self._pause("sent", entry)

            # 4. define on the target, with the VM's NVRAM and TPM state
            await step(f"defining {spec.name} on {target}")
            entry = self.journal.save(msgspec.structs.replace(entry, step="defining",
                                                              defined=True))
            moved = msgspec.structs.replace(spec, disks=[
                msgspec.structs.replace(d, path="") for d in spec.disks])
            await bus.call(target, vm_api.CREATE, VmCreate(spec=moved),
                           timeout=CALL_TIMEOUT_S * 2, idempotency_key=f"migrate:{job.id}")
            if _needs_state(spec):
                await _carry_state(bus, source, target, spec)
            await self._pause("defined", entry)

            # 5. verify, then commit
            await step(f"verifying the sha256 of {len(spec.disks)} disk(s) on {target}")
            entry = self.journal.save(msgspec.structs.replace(entry, step="verifying"))
            paths: dict[tuple[str, str], str] = {}
            for disk in spec.disks:
                got: VolumeInfo = await bus.call(target, storage_api.INFO, VolumeQuery(
                    pool=disk.pool, name=disk.volume, sha256=True), timeout=SHA_TIMEOUT_S)
                want = digests[(disk.pool, disk.volume)]
                if got.sha256 != want:
                    raise BackendError(f"disk {disk.pool}/{disk.volume} differs on {target} "
                                       f"after the transfer (sha256 {got.sha256[:12]} != "
                                       f"{want[:12]})")
                paths[(disk.pool, disk.volume)] = got.path
            there: VmInfo = await bus.call(target, vm_api.INFO, VmRef(vm=spec.uuid),
                                           timeout=CALL_TIMEOUT_S)
            remove, kept = await through_elections(
                lambda: self._let_go_of(spec, keep=req.keep_source))
            entry = self.journal.save(msgspec.structs.replace(entry, step="committing",
                                                              remove=remove))
            # a retry after a lost reply finds the record handed over: Conflict, then the
            # owner check below finishes the migration
            await through_elections(lambda: self.states.hand_over(spec.uuid, job.id, target, [
                msgspec.structs.replace(d, path=paths[(d.pool, d.volume)])
                for d in record.spec.disks], there.accelerator, there.spec.seed))
        except BaseException as e:
            if entry.step == "committing" and await self._owner(spec.uuid) == target:
                pass  # the commit went through though its reply was lost: finish below
            else:
                left = await self._roll_back(entry)
                if isinstance(e, PhyError):
                    raise type(e)(f"migration of {spec.name} to {target} failed at step "
                                  f"{step.done}/{step.total}: {e.message}; the VM is whole "
                                  f"on {source}{left}") from None
                raise
        entry = self.journal.save(msgspec.structs.replace(entry, step="committed"))
        await self._pause("committed", entry)

        # 6. the source lets go
        await step(f"removing {spec.name} from {source}" +
                   (" (keeping its disks)" if req.keep_source else ""))
        try:
            await self._finish(entry)
        except PhyError as e:
            self.agent.spawn(self._settle(entry), f"migration-{spec.uuid}")
            raise BackendError(f"{spec.name} now belongs to {target}, but its old copy on "
                               f"{source} could not be removed yet ({e.message}); the vm "
                               f"agent of {source} keeps trying") from None
        await step("done", advance=False)
        return {"vm": spec.name, "uuid": spec.uuid, "from": source, "to": target,
                "disks": [f"{d.pool}/{d.volume}" for d in spec.disks],
                "removed_from_source": [f"{v.pool}/{v.name}" for v in remove],
                "kept_on_source": kept}

    async def _let_go_of(self, spec: VmSpec, *, keep: bool) -> tuple[list[VolumeRef],
                                                                       list[str]]:
        """The source volumes that go once the VM is moved (all of them, whether the VM made
        them or was given them), and a note for each that stays."""
        if keep:
            return [], [f"{d.pool}/{d.volume} (--keep-source)" for d in spec.disks]
        users = {(d.pool, d.volume): r.spec.name for r in await self.states.records()
                 if r.host == self.host and r.spec.uuid != spec.uuid for d in r.spec.disks}
        remove, kept = [], []
        for d in spec.disks:
            if (user := users.get((d.pool, d.volume))) is not None:
                kept.append(f"{d.pool}/{d.volume} (VM {user} uses it too)")
            else:
                remove.append(VolumeRef(pool=d.pool, name=d.volume))
        return remove, kept

    async def _owner(self, uuid: str) -> str | None:
        """The host the record names (None when unreadable): after a failed commit, whether
        it went through; read through an election, as rolling back a commit that went through
        would remove the VM from its new owner."""
        with contextlib.suppress(PhyError):
            record, _ = await through_elections(lambda: self.states.load(uuid))
            return record.host if record else None
        return None

    async def _pause(self, step: str, entry: Entry) -> None:
        """Crash tests: wait at ``step`` while a marker file exists (see ``PAUSE_ENV``)."""
        if os.environ.get(PAUSE_ENV) != step:
            return
        marker = self.journal.path(entry.uuid).with_suffix(".paused")
        hostfs.write_atomically(marker, step.encode())
        log.warning("migration of %s paused at %s until %s is removed", entry.name, step,
                    marker)
        while marker.exists():
            await asyncio.sleep(0.05)

    async def _roll_back(self, entry: Entry) -> str:
        """Undo what the target got, then unlock; returns a note naming anything left on
        the target. The journal entry goes once the lock is released."""
        bus, target = self.bus, entry.target
        if entry.sending:  # cancelled or crashed mid-transfer: stop the stream too
            with contextlib.suppress(PhyError):
                await bus.call(self.host, storage_api.CANCEL, JobRef(job_id=entry.sending),
                               timeout=CALL_TIMEOUT_S)
        left: list[str] = []
        if entry.defined:
            try:
                await bus.call(target, vm_api.DELETE, VmDelete(vm=entry.uuid, force=True),
                               timeout=CALL_TIMEOUT_S * 2)
            except NotFound:
                pass
            except PhyError as e:
                left.append(f"the VM definition ({e.message})")
        for vol in entry.volumes:
            try:
                await bus.call(target, storage_api.DELETE, vol, timeout=CALL_TIMEOUT_S)
            except NotFound:
                pass
            except PhyError as e:
                left.append(f"volume {vol.pool}/{vol.name} ({e.message})")
        await self.states.unlock(entry.uuid, entry.job_id)
        self.journal.remove(entry.uuid)
        if not left:
            return ""
        return f"; left on {target}, remove by hand: {'; '.join(left)}"

    async def _finish(self, entry: Entry) -> None:
        """After the commit: the source's definition and the volumes it lets go of."""
        try:
            await self.bus.call(self.host, vm_api.DELETE, VmDelete(vm=entry.uuid),
                                timeout=CALL_TIMEOUT_S * 2)
        except NotFound:
            pass
        for vol in entry.remove:
            with contextlib.suppress(NotFound):
                await self.bus.call(self.host, storage_api.DELETE, vol, timeout=CALL_TIMEOUT_S)
        self.journal.remove(entry.uuid)

    # -- after a crash --------------------------------------------------------------------

    async def recover(self) -> None:
        """Settle every migration the journal holds (a crash left them), each in the
        background until it is done: peers, or this agent's own endpoints, may not answer
        yet."""
        for entry in self.journal.entries():
            self.agent.spawn(self._settle(entry), f"migration-{entry.uuid}")

    async def _settle(self, entry: Entry) -> None:
        delay = 0.5
        while True:
            try:
                await self._settle_once(entry)
                return
            except PhyError as e:
                log.warning("migration of %s to %s not settled yet (%s); retrying in %.1f s",
                            entry.name, entry.target, e.message, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECOVERY_BACKOFF_MAX_S)

    async def _settle_once(self, entry: Entry) -> None:
        record, _ = await self.states.load(entry.uuid)
        state: JobState
        if record is not None and record.host == entry.target:
            await self._finish(entry)
            state, message = "succeeded", (f"{entry.name} moved to {entry.target}; the copy on "
                                           f"{self.host} was removed after a restart")
        elif (record is not None and record.migration is not None
              and record.migration.job_id == entry.job_id):
            left = await self._roll_back(entry)
            state, message = "failed", (f"the vm agent of {self.host} stopped while migrating "
                                        f"{entry.name} to {entry.target} ({entry.step}); rolled "
                                        f"back: the VM is whole on {self.host}{left}")
        else:  # settled before the crash, only the journal entry was left
            self.journal.remove(entry.uuid)
            return
        log.warning("migration job %s: %s", entry.job_id, message)
        await self.agent.publish("job", JobFinished(
            host=self.host, job_id=entry.job_id, kind="migrate", state=state,
            message=message), entry.job_id)


async def through_elections(attempt: Callable[[], Awaitable[T]],
                            wait_s: float = ELECTION_WAIT_S) -> T:
    """Run ``attempt`` again while it fails with Unavailable, for up to ``wait_s``.

    For the commit's KV reads and its compare-and-set: a link or a server that just came back
    leaves the KV streams electing leaders for some seconds, and a migration that has moved
    its disks should not be rolled back for that. Past ``wait_s`` the last error stands.
    """
    deadline = time.monotonic() + wait_s
    delay = 0.2
    while True:
        try:
            return await attempt()
        except Unavailable as e:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("migration: %s; trying again in %.1f s", e.message, delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 5.0)


def _has_endpoint(verb: str) -> bool:
    try:
        contracts.spec("vm", verb)
    except InvalidName:
        return False
    return True


async def _exists(call: Awaitable[Any]) -> bool:
    try:
        await call
    except NotFound:
        return False
    return True


def _needs_state(spec: VmSpec) -> bool:
    return spec.firmware == "uefi" or spec.tpm != "none"


async def _preflight(bus: Bus, source: str, target: str,
                     spec: VmSpec) -> dict[tuple[str, str], str]:
    """Refuse what cannot work before touching anything; returns the source disks' sha256."""
    views = {v.host: v for v in await host_views_on(bus)}
    view = views.get(target)
    if view is None:
        raise NotFound(f"no host {target!r} in the cluster; `phyllome hosts` lists them")
    for disk in spec.disks:
        if not disk.volume:
            raise BadRequest(f"disk {disk.path} of {spec.name} is a plain file, not a pool "
                             "volume; import it with `phyllome storage import` first")
    if spec.kernel or spec.initrd:
        log.info("%s boots a kernel from %s: it must exist on %s too", spec.name,
                 spec.kernel, target)
    if _needs_state(spec) and not (_has_endpoint("export_state")
                                   and _has_endpoint("import_state")):
        raise Unavailable(f"{spec.name} has UEFI variables or TPM state, and the vm agents "
                          "cannot carry them between hosts yet (no export_state/import_state "
                          "endpoints); update Phyllome")
    disk_bytes: dict[str, int] = {}
    digests: dict[tuple[str, str], str] = {}
    for disk in spec.disks:
        vol: VolumeInfo = await bus.call(source, storage_api.INFO, VolumeQuery(
            pool=disk.pool, name=disk.volume, sha256=True), timeout=SHA_TIMEOUT_S)
        digests[(disk.pool, disk.volume)] = vol.sha256
        disk_bytes[disk.pool] = disk_bytes.get(disk.pool, 0) + vol.allocated_bytes
    others = [r for r in await cluster_vms(bus) if r.spec.uuid != spec.uuid]
    committed = committed_mib(others).get(target, 0)
    for pool, size in (disk_bytes.items() or [("default", 0)]):
        why = refusal(view, needs(spec, disk_bytes=size, pool=pool), committed)
        if why is not None:
            raise InsufficientResources(f"{target} cannot take {spec.name}: {why}")
    await check_networks(bus, target, spec)
    for ref in (spec.name, spec.uuid):
        if await _exists(bus.call(target, vm_api.INFO, VmRef(vm=ref), timeout=CALL_TIMEOUT_S)):
            raise Conflict(f"{target} has a VM {ref} already; rename or delete one of them")
    for disk in spec.disks:
        if await _exists(bus.call(target, storage_api.INFO, VolumeQuery(
                pool=disk.pool, name=disk.volume), timeout=CALL_TIMEOUT_S)):
            raise Conflict(f"{target} has a volume {disk.pool}/{disk.volume} already (left "
                           "by an earlier try?); delete it there with `phyllome storage "
                           f"delete {disk.pool}/{disk.volume} --host {target}` if it is not "
                           "in use")
    return digests


async def check_networks(bus: Bus, target: str, spec: VmSpec) -> None:
    """Refuse a move to a host that lacks a network or a bridge the VM's NICs are on (the VM
    would be defined there but could not start)."""
    networks = {n.source for n in spec.nics if n.kind == "network"}
    bridges = {n.source for n in spec.nics if n.kind == "bridge"}
    if not networks and not bridges:
        return
    have = await bus.call(target, net_api.NET_LIST, Empty(), timeout=CALL_TIMEOUT_S)
    missing = [f"network {n}" for n in sorted(networks - {x.name for x in have.networks})]
    missing += [f"bridge {b}" for b in sorted(bridges - set(have.bridges))]
    if missing:
        raise Conflict(f"{target} has no {', '.join(missing)}, which the NICs of {spec.name} "
                       f"are on: create them there first (`phyllome net create ... --host "
                       f"{target}`), or detach those NICs")


async def _carry_state(bus: Bus, source: str, target: str, spec: VmSpec) -> None:
    """NVRAM and TPM state from the source's vm agent to the target's."""
    state = await bus.call(source, vm_api.EXPORT_STATE, VmRef(vm=spec.uuid),
                           timeout=CALL_TIMEOUT_S)
    await bus.call(target, vm_api.IMPORT_STATE, state, timeout=CALL_TIMEOUT_S)
