"""Cold migration of a stopped VM to another host: a job of the source host's vm agent.

Run only by the vm agent (its ``migrate`` endpoint); everything else goes through the
agents' bus contracts::

    accepted = agent.jobs.start("migrate", lambda job: migrate(agent.bus, agent.host, req, job),
                                key=f"migrate:{req.vm}")

Steps, each one a job progress event on ``phy.evt.<source>.vm.job.<id>``:

1. the VM must be shut off (with ``shutdown``: ACPI shutdown first, forced after a wait);
2. preflight on the target: up, vm and storage agents there, memory / pool space /
   firmware / swtpm / GPUs (``shared.placement.refusal``), no VM or volume of that name or
   uuid, every disk a pool volume; the source disks' sha256;
3. every disk streamed by the storage agents (``storage.send``: resumable, checksummed);
4. the domain defined on the target (same uuid, MACs, spec; paths from the target pools);
   NVRAM and TPM state carried over (``vm.export_state`` -> ``vm.import_state``);
5. the target's copy of every disk checked against the source's sha256;
6. only then the source undefines the VM and deletes its own disks (``keep_source`` keeps
   them).

A failure before 6 rolls back what was made on the target (the VM, the received volumes)
and restores the VM's record, so the VM stays whole and defined on the source only; the
job fails with a message that says at which step and why, and can be run again.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable
from typing import Any, Protocol

import msgspec
import nats.errors
import nats.js.errors

from shared import contracts, subjects
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
from shared.messages import storage as storage_api
from shared.messages import vm as vm_api
from shared.messages.jobs import JobAccepted, JobProgress, JobRef
from shared.messages.storage import SendVolume, VolumeInfo, VolumeQuery, VolumeRef
from shared.messages.vm import VmCreate, VmDelete, VmInfo, VmMigrate, VmRef, VmShutdown, VmSpec
from shared.placement import committed_mib, needs, refusal

log = logging.getLogger("phyllome.migration")

CALL_TIMEOUT_S = 15.0
SHA_TIMEOUT_S = 600.0
SHUTDOWN_WAIT_S = 120.0
TRANSFER_TIMEOUT_S = 24 * 3600.0


class Job(Protocol):
    """What the migration needs of its job (``shared.jobs.Job`` is one)."""

    id: str
    kind: str

    async def progress(self, done: int, total: int, message: str = "", *,
                       now: bool = False) -> None: ...


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


async def migrate(bus: Bus, source: str, req: VmMigrate, job: Job) -> dict[str, object]:
    """The migration job (see the module doc); returns what moved where."""
    target = subjects.token(req.to, "target host")
    if target == source:
        raise BadRequest(f"VM {req.vm} is on {source} already; give another host with --to")
    info: VmInfo = await bus.call(source, vm_api.INFO, VmRef(vm=req.vm), timeout=CALL_TIMEOUT_S)
    spec = info.spec
    step = _Step(job, len(spec.disks))

    # 1. shut off
    if info.state not in ("shutoff", "crashed"):
        if not req.shutdown:
            raise Conflict(f"VM {info.name} is {info.state}: cold migration needs it shut off; "
                           "stop it first, or migrate with --shutdown")
        await step(f"shutting {info.name} down", advance=False)
        info = await bus.call(source, vm_api.SHUTDOWN, VmShutdown(
            vm=spec.uuid, timeout_s=SHUTDOWN_WAIT_S, force=True),
            timeout=SHUTDOWN_WAIT_S + CALL_TIMEOUT_S)
        if info.state not in ("shutoff", "crashed"):
            raise Conflict(f"VM {info.name} is still {info.state} after shutdown")

    # 2. preflight
    await step(f"preflight on {target}")
    digests = await _preflight(bus, source, target, spec)

    made_volumes: list[VolumeRef] = []
    sending: list[JobAccepted] = []
    defined = False
    record = await _record_bytes(bus, spec.uuid)
    try:
        # 3. disks
        for i, disk in enumerate(spec.disks):
            label = f"disk {i + 1}/{len(spec.disks)} ({disk.pool}/{disk.volume})"
            await step(f"sending {label} to {target}", advance=False)
            accepted = await bus.call(source, storage_api.SEND, SendVolume(
                pool=disk.pool, name=disk.volume, to_host=target, dst_pool=disk.pool,
                bwlimit_bytes_s=req.bwlimit_bytes_s), timeout=CALL_TIMEOUT_S)
            made_volumes.append(VolumeRef(pool=disk.pool, name=disk.volume))
            sending[:] = [accepted]

            async def forward(sent: JobProgress, label: str = label) -> None:
                pct = f" {100 * sent.done // sent.total}%" if sent.total else ""
                await job.progress(step.done, step.total, f"sending {label}{pct}")

            succeeded(await wait_job(bus, source, "storage", accepted, timeout=TRANSFER_TIMEOUT_S,
                                     on_progress=forward))
            sending.clear()
            step.done += 1

        # 4. define on the target, with the VM's NVRAM and TPM state
        await step(f"defining {spec.name} on {target}")
        moved = msgspec.structs.replace(spec, disks=[
            msgspec.structs.replace(d, path="") for d in spec.disks])
        await bus.call(target, vm_api.CREATE, VmCreate(spec=moved), timeout=CALL_TIMEOUT_S * 2,
                       idempotency_key=f"migrate:{spec.uuid}:{target}")
        defined = True
        if _needs_state(spec):
            await _carry_state(bus, source, target, spec)

        # 5. verify
        await step(f"verifying the sha256 of {len(spec.disks)} disk(s) on {target}")
        for disk in spec.disks:
            got: VolumeInfo = await bus.call(target, storage_api.INFO, VolumeQuery(
                pool=disk.pool, name=disk.volume, sha256=True), timeout=SHA_TIMEOUT_S)
            if got.sha256 != digests[(disk.pool, disk.volume)]:
                raise BackendError(f"disk {disk.pool}/{disk.volume} differs on {target} after "
                                   f"the transfer (sha256 {got.sha256[:12]} != "
                                   f"{digests[(disk.pool, disk.volume)][:12]})")
    except BaseException as e:
        for accepted in sending:  # this job was cancelled mid-transfer: stop the stream too
            with contextlib.suppress(PhyError):
                await bus.call(source, storage_api.CANCEL, JobRef(job_id=accepted.job_id),
                               timeout=CALL_TIMEOUT_S)
        left = await _roll_back(bus, target, spec, made_volumes, defined, record)
        if isinstance(e, PhyError):
            raise type(e)(f"migration of {spec.name} to {target} failed at step "
                          f"{step.done}/{step.total}: {e.message}; the VM is whole on "
                          f"{source}{left}") from None
        raise

    # 6. the source lets go
    await step(f"removing {spec.name} from {source}" +
               (" (keeping its disks)" if req.keep_source else ""))
    try:
        await bus.call(source, vm_api.DELETE, VmDelete(
            vm=spec.uuid, delete_disks=not req.keep_source), timeout=CALL_TIMEOUT_S * 4)
    except PhyError as e:
        raise BackendError(f"{spec.name} now runs from {target}, but its old definition on "
                           f"{source} could not be removed ({e.message}); remove it with "
                           f"`phyllome vm delete {spec.name} --host {source}`") from None
    await step("done", advance=False)
    return {"vm": spec.name, "uuid": spec.uuid, "from": source, "to": target,
            "disks": [f"{d.pool}/{d.volume}" for d in spec.disks],
            "source_disks_kept": req.keep_source}


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
    bindable = set(view.resources.get("gpus_bindable", []))
    if missing := [d for d in spec.hostdevs if d not in bindable]:
        raise InsufficientResources(f"{target} has no bindable {', '.join(missing)} for "
                                    f"{spec.name}")
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


async def _carry_state(bus: Bus, source: str, target: str, spec: VmSpec) -> None:
    """NVRAM and TPM state from the source's vm agent to the target's."""
    state = await bus.call(source, vm_api.EXPORT_STATE, VmRef(vm=spec.uuid),
                           timeout=CALL_TIMEOUT_S)
    await bus.call(target, vm_api.IMPORT_STATE, state, timeout=CALL_TIMEOUT_S)


async def _record_bytes(bus: Bus, uuid: str) -> bytes | None:
    kv = await bus.kv(subjects.KV_VMS)
    try:
        entry = await kv.get(uuid)
    except nats.js.errors.KeyNotFoundError:  # no record (yet): nothing to restore
        return None
    return bytes(entry.value) if entry.value else None


async def _roll_back(bus: Bus, target: str, spec: VmSpec, volumes: list[VolumeRef],
                     defined: bool, record: bytes | None) -> str:
    """Undo what the target got; returns a note naming anything that could not be undone."""
    left: list[str] = []
    if defined:
        try:
            await bus.call(target, vm_api.DELETE, VmDelete(vm=spec.uuid, force=True),
                           timeout=CALL_TIMEOUT_S * 2)
        except NotFound:
            pass
        except PhyError as e:
            left.append(f"the VM definition ({e.message})")
    for vol in volumes:
        try:
            await bus.call(target, storage_api.DELETE, vol, timeout=CALL_TIMEOUT_S)
        except NotFound:
            pass
        except PhyError as e:
            left.append(f"volume {vol.pool}/{vol.name} ({e.message})")
    if record is not None:  # the target's create and delete rewrote the VM's record
        try:
            await (await bus.kv(subjects.KV_VMS)).put(spec.uuid, record)
        except (nats.errors.Error, TimeoutError) as e:
            log.warning("could not restore the record of %s: %r", spec.name, e)
    if not left:
        return ""
    return f"; left on {target}, remove by hand: {'; '.join(left)}"
