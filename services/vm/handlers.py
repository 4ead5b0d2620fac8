"""The vm endpoints: checks at the edge, then the hypervisor, the peers (catalogue, storage,
hardware) and the VM records (``state.VmStates``, which also bridges hypervisor events to
the bus and reconciles)::

    handlers = Handlers(agent, LibvirtHypervisor(uri), settings, decision)
    await handlers.begin()
    info = await handlers.start(VmRef(vm="demo"))
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid as uuidlib
from typing import Any

import msgspec

from services.vm import hostfs
from services.vm.accel import Accel
from services.vm.config import Settings
from services.vm.console_bridge import ConsoleBridge, pty_target, tcp_target
from services.vm.hypervisor import Domain, Hypervisor
from services.vm.metrics import VmMetrics
from services.vm.spec import check_name, check_spec, is_pci_address
from services.vm.state import RUNNING, STOPPED, VmStates, with_secrets
from shared import contracts, migration
from shared.agent import Agent
from shared.errors import (
    BackendError,
    BadRequest,
    Conflict,
    InsufficientResources,
    NotFound,
    PhyError,
    Timeout,
    Unavailable,
)
from shared.messages import Ack, Empty
from shared.messages import catalogue as catalogue_api
from shared.messages import hardware as hardware_api
from shared.messages import storage as storage_api
from shared.messages.catalogue import ImageInfo, ImageRef
from shared.messages.hardware import (
    BootProbe,
    DeviceList,
    DeviceQuery,
    DeviceRef,
    HostCaps,
    PciDevice,
)
from shared.messages.jobs import JobAccepted, JobRef, JobStatus
from shared.messages.storage import CloneVolume, ImportVolume, VolumeInfo, VolumeQuery, VolumeRef
from shared.messages.vm import (
    AcceleratorDecision,
    AcceleratorFallback,
    ConsoleOpen,
    ConsoleSession,
    Disk,
    VmClone,
    VmCreate,
    VmDelete,
    VmGuestState,
    VmInfo,
    VmList,
    VmListRequest,
    VmMigrate,
    VmRecord,
    VmRef,
    VmShutdown,
    VmSpec,
    VmUpdate,
)

log = logging.getLogger("phyllome.vm")

PEER_TIMEOUT_S = 10.0
JOB_TIMEOUT_S = 3600.0
HEALTH_S = 60.0  # how often the host's problems (hypervisor.problems) are checked again


def random_mac() -> str:
    """A MAC in QEMU's locally administered range 52:54:00."""
    return "52:54:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))


def redacted(spec: VmSpec) -> VmSpec:
    return msgspec.structs.replace(spec, password="********") if spec.password else spec


class Handlers:
    """One vm agent's endpoints over one hypervisor; see the module docstring."""

    def __init__(self, agent: Agent, hypervisor: Hypervisor, settings: Settings,
                 decision: AcceleratorDecision) -> None:
        self.agent = agent
        self.host = agent.host
        self.hv = hypervisor
        self.settings = settings
        self.decision = decision
        self.metrics = VmMetrics(agent.registry, hypervisor, lambda: self.states.started_at())
        self.states = VmStates(agent, hypervisor, self.metrics)
        self.consoles = ConsoleBridge(agent.bus.nc, agent.host)

    # -- life of the agent ----------------------------------------------------------------

    async def begin(self) -> None:
        """First reconciliation, then the event bridge and the periodic pass."""
        if self.decision.kvm_usable is False:
            await self.agent.publish("accelerator", AcceleratorFallback(
                host=self.host, reason=self.decision.note))
        self.agent.spawn(self._report_probe(), "report-probe")
        await self.states.reconcile()
        self.agent.spawn(self.states.bridge(), "events")
        self.agent.spawn(self.states.periodic(self.settings.reconcile_s), "reconcile")
        self.agent.spawn(self._watch_health(), "health")

    async def close(self) -> None:
        await self.consoles.close()
        await self.hv.close()

    async def _watch_health(self) -> None:
        """Keep the agent's problems (its heartbeat, ``phyllome status``) true to the
        hypervisor's; a change is logged and beaten at once."""
        while True:
            try:
                found = await self.hv.problems()
            except PhyError as e:
                log.debug("host problems not checked: %s", e.message)
            else:
                if found != self.agent.problems:
                    for p in found:
                        if p not in self.agent.problems:
                            log.warning("%s; fix: %s", p.what, p.fix)
                    self.agent.problems = found
                    await self.agent.beat()
            await asyncio.sleep(HEALTH_S)

    async def _report_probe(self) -> None:
        """Tell the hardware agent what the boot probe found (its host caps carry it);
        it may start after us, so keep trying with backoff."""
        if self.decision.kvm_usable is None:
            return
        probe = BootProbe(result="passed" if self.decision.kvm_usable else "failed",
                          detail=self.decision.note)
        delay = 1.0
        while True:
            try:
                await self.agent.bus.call(self.host, hardware_api.BOOT_PROBE, probe,
                                          timeout=PEER_TIMEOUT_S)
                return
            except Unavailable as e:
                log.debug("boot probe not reported yet: %s", e.message)
            except PhyError as e:
                log.warning("the hardware agent refused the boot probe: %s", e.message)
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 60.0)

    # -- checks ---------------------------------------------------------------------------

    async def _refuse_duplicate(self, spec: VmSpec) -> None:
        for ref, what in ((spec.name, "name"), (spec.uuid, "uuid")):
            try:
                dom = await self.hv.domain(ref)
            except NotFound:
                continue
            raise Conflict(f"a VM with {what} {ref} exists already on {self.host} "
                           f"({dom.name}, {dom.state}); choose another {what}")

    async def _check_memory(self, spec: VmSpec) -> None:
        host_mib = await self.hv.host_memory_mib()
        if spec.memory_mib > host_mib:
            raise InsufficientResources(
                f"VM {spec.name} asks for {spec.memory_mib} MiB of memory and host "
                f"{self.host} has {host_mib} MiB: give less memory")

    def _accelerator(self, spec: VmSpec) -> Accel:
        accel = self.decision.accelerator if spec.accelerator == "auto" else spec.accelerator
        if spec.nested and accel != "kvm":
            raise BadRequest(f"nested virtualization needs KVM, and VM {spec.name} would run "
                             f"under TCG ({self.decision.note})")
        return accel

    async def _check_nested(self, spec: VmSpec) -> None:
        """Refuse ``nested`` when the hardware agent says the KVM module has it off."""
        if not spec.nested:
            return
        try:
            caps: HostCaps = await self.agent.bus.call(self.host, hardware_api.CAPS, Empty(),
                                                       timeout=PEER_TIMEOUT_S)
        except Unavailable as e:
            log.warning("nested VM %s: cannot ask the hardware agent (%s)", spec.name, e.message)
            return
        if caps.nested is False:
            modules = ", ".join(caps.kvm_modules) or "kvm_intel/kvm_amd"
            raise BadRequest(f"host {self.host} does not allow nested virtualization: load "
                             f"{modules} with nested=1, or drop --nested")

    async def _check_hostdevs(self, devs: list[str]) -> None:
        """Refuse devices the hardware agent does not call bound to vfio-pci or bindable."""
        bus = self.agent.bus
        try:
            for dev in devs:
                if is_pci_address(dev):
                    d: PciDevice = await bus.call(self.host, hardware_api.DEVICE,
                                                  DeviceRef(address=dev), timeout=PEER_TIMEOUT_S)
                    self._passable(d, devs)
                    continue
                found: DeviceList = await bus.call(self.host, hardware_api.LIST,
                                                   DeviceQuery(), timeout=PEER_TIMEOUT_S)
                if not any(dev.lower() in (i.lower() for i in t.instances)
                           for d in found.devices for t in d.mdev_types):
                    raise NotFound(f"no mediated device {dev} on {self.host}; create it with "
                                   "`phyllome hw mdev create`")
        except Unavailable as e:
            raise Unavailable(f"host devices need the hardware agent's word that they can be "
                              f"passed through, and it does not answer ({e.message})") from None

    @staticmethod
    def _passable(d: PciDevice, asked: list[str]) -> None:
        if d.driver == "vfio-pci":
            return
        p = d.passthrough
        why = "; ".join(p.reasons) if p and p.reasons else "no passthrough verdict"
        if p is None or p.verdict in ("no-iommu", "shared-group"):
            shares = f" (its IOMMU group also holds {', '.join(p.shares_with)})" \
                if p and p.shares_with else ""
            raise Conflict(f"host device {d.address} is not bound to vfio-pci and cannot be "
                           f"bound{shares}: {why}")
        if p.host_loses:
            raise Conflict(f"host device {d.address}: the host would lose "
                           f"{', '.join(p.host_loses)}")
        missing = [c for c in p.companions if c not in asked]
        if missing:
            raise Conflict(f"host device {d.address} must be passed together with "
                           f"{', '.join(missing)} (same physical device)")

    # -- disks ----------------------------------------------------------------------------

    async def _resolve_disks(self, spec: VmSpec) -> VmSpec:
        """Fill in the paths of volume disks, and check that every disk is RAW."""
        disks = []
        for disk in spec.disks:
            if not disk.path:
                vol: VolumeInfo = await self.agent.bus.call(
                    self.host, storage_api.INFO,
                    VolumeQuery(pool=disk.pool or "default", name=disk.volume),
                    timeout=PEER_TIMEOUT_S)
                disk = msgspec.structs.replace(disk, path=vol.path, pool=vol.pool)
            await asyncio.to_thread(hostfs.check_raw, disk.path)
            disks.append(disk)
        return msgspec.structs.replace(spec, disks=disks)

    async def _wait_job(self, svc: str, accepted: JobAccepted) -> JobStatus:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while True:
            status: JobStatus = await self.agent.bus.call(
                self.host, contracts.spec(svc, "job"), JobRef(job_id=accepted.job_id),
                timeout=PEER_TIMEOUT_S)
            if status.state != "running":
                if status.state != "succeeded":
                    raise BackendError(f"{svc} {accepted.kind} {status.state}: {status.message}")
                return status
            if time.monotonic() > deadline:
                raise Timeout(f"{svc} {accepted.kind} did not finish in {JOB_TIMEOUT_S:g} s")
            await asyncio.sleep(0.2)

    async def _copy_disk(self, src: Disk, dst_name: str) -> Disk:
        """A new owned disk with ``src``'s content: via the storage agent for volumes, else
        a local reflink/sparse copy beside the source (or in the disk dir)."""
        bus = self.agent.bus
        if src.volume:
            pool = src.pool or "default"
            accepted = await bus.call(self.host, storage_api.CLONE, CloneVolume(
                pool=pool, name=src.volume, dst_name=dst_name), timeout=PEER_TIMEOUT_S)
            await self._wait_job("storage", accepted)
            vol: VolumeInfo = await bus.call(self.host, storage_api.INFO, VolumeQuery(
                pool=pool, name=dst_name), timeout=PEER_TIMEOUT_S)
            return Disk(path=vol.path, pool=pool, volume=dst_name, bus=src.bus, owned=True)
        path = f"{self.settings.disk_dir}/{dst_name}.raw"
        await hostfs.copy_disk(src.path, path)
        return Disk(path=path, bus=src.bus, owned=True)

    async def _disk_from_image(self, image: str, vm_name: str) -> Disk:
        """The image's RAW file (from the catalogue) cloned into a new disk of the VM."""
        bus = self.agent.bus
        try:
            info: ImageInfo = await bus.call(self.host, catalogue_api.INFO,
                                             ImageRef(id=image), timeout=PEER_TIMEOUT_S)
        except Unavailable as e:
            raise Unavailable(f"--image needs the catalogue agent ({e.message}); "
                              "or give a disk with --disk") from None
        if not info.path:
            raise Conflict(f"image {image} is not on {self.host} yet: run "
                           f"`phyllome images pull {image}` first")
        name = f"{vm_name}-disk0"
        try:
            accepted = await bus.call(self.host, storage_api.IMPORT_FILE, ImportVolume(
                pool="default", name=name, source=info.path), timeout=PEER_TIMEOUT_S)
        except Unavailable:
            log.info("no storage agent; copying image %s locally", image)
            return await self._copy_disk(Disk(path=info.path), name)
        await self._wait_job("storage", accepted)
        vol: VolumeInfo = await bus.call(self.host, storage_api.INFO, VolumeQuery(
            pool="default", name=name), timeout=PEER_TIMEOUT_S)
        return Disk(path=vol.path, pool="default", volume=name, owned=True)

    async def _delete_disk(self, disk: Disk) -> None:
        if disk.volume:
            await self.agent.bus.call(self.host, storage_api.DELETE, VolumeRef(
                pool=disk.pool or "default", name=disk.volume), timeout=PEER_TIMEOUT_S)
        else:
            await asyncio.to_thread(hostfs.remove, disk.path)

    # -- building -------------------------------------------------------------------------

    def _console_log(self, uuid: str) -> str:
        return f"{self.settings.console_dir}/{uuid}.log"

    async def _define(self, spec: VmSpec) -> Domain:
        accel = self._accelerator(spec)
        hostfs.ensure_dir(self.settings.console_dir)
        return await self.hv.define(spec, accelerator=accel,
                                    console_log=self._console_log(spec.uuid))

    async def _spec_with_secrets(self, record: VmRecord | None, dom: Domain) -> VmSpec | None:
        """The spec to rebuild a domain from: KV's, with the console password that only
        the hypervisor keeps."""
        secure = await self.hv.spec(dom.uuid)
        return with_secrets(record.spec, secure) if record else secure

    async def _info(self, ref: str) -> VmInfo:
        dom = await self.hv.domain(ref)
        record, _ = await self.states.load(dom.uuid)
        spec = record.spec if record else dom.spec or VmSpec(name=dom.name, uuid=dom.uuid)
        stats = await self.hv.stats(dom.uuid)
        consoles = await self.hv.consoles(dom.uuid) if dom.state in RUNNING else {}
        started = record.started_at if record and dom.state in RUNNING else 0.0
        note = ""
        if dom.accelerator == "tcg":
            note = ("forced by the VM's spec" if spec.accelerator == "tcg"
                    else self.decision.note)
        return VmInfo(
            name=dom.name, uuid=dom.uuid, host=self.host, state=dom.state, reason=dom.reason,
            accelerator=dom.accelerator, accelerator_note=note,
            uptime_s=round(time.time() - started, 3) if started else 0.0,
            vcpus=spec.vcpus, memory_mib=spec.memory_mib, cpu_time_s=stats.cpu_time_s,
            memory_rss_bytes=stats.memory_rss_bytes, autostart=dom.autostart,
            vnc=consoles.get("vnc"), spice=consoles.get("spice"), spec=redacted(spec))

    # -- endpoints ------------------------------------------------------------------------

    async def create(self, req: VmCreate) -> VmInfo:
        with self.metrics.operation("create"):
            spec = req.spec
            if not spec.uuid:
                spec = msgspec.structs.replace(spec, uuid=str(uuidlib.uuid4()))
            check_spec(spec)
            self._accelerator(spec)
            await self._check_nested(spec)
            await self._refuse_duplicate(spec)
            await self._check_memory(spec)
            await self._check_hostdevs(spec.hostdevs)
            spec = await self._resolve_disks(spec)
            spec = msgspec.structs.replace(spec, nics=[
                n if n.mac else msgspec.structs.replace(n, mac=random_mac()) for n in spec.nics])
            made: Disk | None = None
            try:
                if req.image:
                    made = await self._disk_from_image(req.image, spec.name)
                    spec = msgspec.structs.replace(spec, disks=[made, *spec.disks])
                dom = await self._define(spec)
                try:
                    if spec.autostart:
                        await self.hv.set_autostart(dom.uuid, True)
                    await self.states.write(spec, dom)
                except BaseException:
                    await self.hv.undefine(dom.uuid)
                    raise
            except BaseException:
                if made is not None:
                    await self._delete_disk(made)
                raise
            log.info("defined VM %s (%s)", spec.name, spec.uuid)
            return await self._info(dom.uuid)

    async def start(self, req: VmRef) -> VmInfo:
        with self.metrics.operation("start"):
            dom = await self.hv.domain(req.vm)
            if dom.state not in STOPPED:
                raise Conflict(f"VM {dom.name} is {dom.state} already")
            hostfs.ensure_dir(self.settings.console_dir)
            await self.hv.start(dom.uuid)
            return await self._info(dom.uuid)

    async def shutdown(self, req: VmShutdown) -> VmInfo:
        with self.metrics.operation("shutdown"):
            dom = await self.hv.domain(req.vm)
            if dom.state not in RUNNING:
                raise Conflict(f"VM {dom.name} is {dom.state}: nothing to shut down")
            await self.hv.shutdown(dom.uuid)
            if req.timeout_s > 0:
                try:
                    await self.states.wait_state(dom.uuid, STOPPED, req.timeout_s)
                except Timeout as e:
                    if not req.force:
                        raise Timeout(f"{e.message}: the guest ignored the ACPI power button; "
                                      "use --force to power it off") from None
                    log.info("VM %s ignored ACPI shutdown; powering off", dom.name)
                    await self.hv.destroy(dom.uuid)
            return await self._info(dom.uuid)

    async def destroy(self, req: VmRef) -> VmInfo:
        with self.metrics.operation("destroy"):
            dom = await self.hv.domain(req.vm)
            if dom.state not in RUNNING:
                raise Conflict(f"VM {dom.name} is {dom.state}: not running")
            await self.hv.destroy(dom.uuid)
            return await self._info(dom.uuid)

    async def reboot(self, req: VmRef) -> VmInfo:
        with self.metrics.operation("reboot"):
            dom = await self.hv.domain(req.vm)
            if dom.state != "running":
                raise Conflict(f"VM {dom.name} is {dom.state}: only a running VM reboots")
            await self.hv.reboot(dom.uuid)
            return await self._info(dom.uuid)

    async def suspend(self, req: VmRef) -> VmInfo:
        with self.metrics.operation("suspend"):
            dom = await self.hv.domain(req.vm)
            if dom.state != "running":
                raise Conflict(f"VM {dom.name} is {dom.state}: only a running VM suspends")
            await self.hv.suspend(dom.uuid)
            return await self._info(dom.uuid)

    async def resume(self, req: VmRef) -> VmInfo:
        with self.metrics.operation("resume"):
            dom = await self.hv.domain(req.vm)
            if dom.state != "paused":
                raise Conflict(f"VM {dom.name} is {dom.state}: only a paused VM resumes")
            await self.hv.resume(dom.uuid)
            return await self._info(dom.uuid)

    async def delete(self, req: VmDelete) -> Ack:
        with self.metrics.operation("delete"):
            dom = await self.hv.domain(req.vm)
            if dom.state not in STOPPED:
                if not req.force:
                    raise Conflict(f"VM {dom.name} is {dom.state}: stop it first, or delete "
                                   "with --force")
                await self.hv.destroy(dom.uuid)
            record, _ = await self.states.load(dom.uuid)
            spec = record.spec if record else dom.spec
            await self.hv.undefine(dom.uuid)
            await self.states.gone(dom.uuid, dom.name, "undefined", "removed")
            await asyncio.to_thread(hostfs.remove, self._console_log(dom.uuid))
            removed = []
            if req.delete_disks and spec is not None:
                for disk in spec.disks:
                    if disk.owned:
                        await self._delete_disk(disk)
                        removed.append(disk.volume or disk.path)
            log.info("deleted VM %s (%s)", dom.name, dom.uuid)
            disks = f" and its disks {', '.join(removed)}" if removed else ""
            return Ack(message=f"deleted VM {dom.name}{disks}")

    async def list(self, req: VmListRequest) -> VmList:
        records = await self.states.records()
        mine = [r for r in records if req.all_hosts or r.host == self.host]
        mine.sort(key=lambda r: (r.host, r.spec.name))
        return VmList(vms=[msgspec.structs.replace(r, spec=redacted(r.spec)) for r in mine])

    async def info(self, req: VmRef) -> VmInfo:
        return await self._info(req.vm)

    async def update(self, req: VmUpdate) -> VmInfo:
        with self.metrics.operation("update"):
            dom = await self.hv.domain(req.vm)
            if dom.state not in STOPPED:
                raise Conflict(f"VM {dom.name} is {dom.state}: update changes a stopped VM; "
                               "stop it first")
            record, _ = await self.states.load(dom.uuid)
            old = await self._spec_with_secrets(record, dom)
            if old is None:
                raise NotFound(f"VM {dom.name} was not made by Phyllome; it has no spec")
            changes = {f: getattr(req, f) for f in req.__struct_fields__
                       if f != "vm" and getattr(req, f) is not None}
            spec = msgspec.structs.replace(old, **changes)
            check_spec(spec)
            await self._check_memory(spec)
            await self._check_nested(spec)
            await self._check_hostdevs([d for d in spec.hostdevs if d not in old.hostdevs])
            dom = await self._define(spec)
            if spec.autostart != old.autostart:
                await self.hv.set_autostart(dom.uuid, spec.autostart)
            await self.states.write(spec, dom, revision=(record.revision if record else 1) + 1)
            return await self._info(dom.uuid)

    async def console(self, req: ConsoleOpen) -> ConsoleSession:
        """Bridge the VM's VNC display or serial port to a session (``console_bridge``)."""
        dom = await self.hv.domain(req.vm)
        if dom.state not in RUNNING:
            raise Conflict(f"VM {dom.name} is {dom.state}: start it to use its console")
        if req.kind == "vnc":
            vnc = (await self.hv.consoles(dom.uuid)).get("vnc")
            if vnc is None:
                raise Conflict(f"VM {dom.name} has no VNC display; give it one with "
                               "`phyllome vm update --display vnc` while it is stopped")
            target = await tcp_target(vnc.host, vnc.port)
        else:
            target = await pty_target(await self.hv.serial_pty(dom.uuid))
        return await self.consoles.open(uuid=dom.uuid, name=dom.name, kind=req.kind,
                                        target=target)

    async def export_state(self, req: VmRef) -> VmGuestState:
        dom = await self.hv.domain(req.vm)
        if dom.state not in STOPPED:
            raise Conflict(f"VM {dom.name} is {dom.state}: its state is exported stopped only")
        nvram, tpm = await self.hv.export_state(dom.uuid)
        return VmGuestState(uuid=dom.uuid, nvram=nvram, tpm=tpm)

    async def import_state(self, req: VmGuestState) -> Ack:
        dom = await self.hv.domain(req.uuid)
        if dom.state not in STOPPED:
            raise Conflict(f"VM {dom.name} is {dom.state}: state is imported stopped only")
        await self.hv.import_state(dom.uuid, req.nvram, req.tpm)
        return Ack(message=f"VM {dom.name}: NVRAM {len(req.nvram)} bytes, TPM state "
                           f"{len(req.tpm)} bytes installed")

    async def migrate(self, req: VmMigrate) -> JobAccepted:
        """Cold migration to ``req.to``, a job run here (see ``shared.migration``)."""
        dom = await self.hv.domain(req.vm)

        async def work(job: Any) -> dict[str, object]:
            with self.metrics.operation("migrate"):
                return await migration.migrate(self.agent.bus, self.host, req, job)

        return self.agent.jobs.start("migrate", work, key=f"migrate:{dom.uuid}:{req.to}")

    async def clone(self, req: VmClone) -> JobAccepted:
        src = await self.hv.domain(req.vm)
        if src.state not in STOPPED:
            raise Conflict(f"VM {src.name} is {src.state}: clone needs a stopped VM")
        record, _ = await self.states.load(src.uuid)
        base = await self._spec_with_secrets(record, src)
        if base is None:
            raise NotFound(f"VM {src.name} was not made by Phyllome; it has no spec")
        spec = msgspec.structs.replace(
            base, name=check_name(req.name), uuid=str(uuidlib.uuid4()),
            nics=[msgspec.structs.replace(n, mac=random_mac()) for n in base.nics],
            autostart=False)
        await self._refuse_duplicate(spec)

        async def work(job: Any) -> dict[str, object]:
            with self.metrics.operation("clone"):
                return await self._clone(job, src, spec)

        return self.agent.jobs.start("clone", work, key=f"clone:{src.uuid}:{req.name}")

    async def _clone(self, job: Any, src: Domain, spec: VmSpec) -> dict[str, object]:
        made: list[Disk] = []
        defined = ""
        steps = len(spec.disks) + 2
        try:
            disks = []
            for i, disk in enumerate(spec.disks):
                await job.progress(i, steps, f"disk {i + 1} of {len(spec.disks)}")
                if disk.readonly and not disk.owned:  # shared media stay shared
                    disks.append(disk)
                    continue
                new = await self._copy_disk(disk, f"{spec.name}-disk{i}")
                made.append(new)
                disks.append(new)
            spec = msgspec.structs.replace(spec, disks=disks)
            await job.progress(steps - 2, steps, "defining")
            dom = await self._define(spec)
            defined = dom.uuid
            await job.progress(steps - 1, steps, "copying NVRAM and TPM state")
            await self.hv.copy_state(src.uuid, dom.uuid)
            await self.states.write(spec, dom)
            await job.progress(steps, steps, "done")
            return {"name": spec.name, "uuid": dom.uuid, "from": src.name}
        except BaseException:
            if defined:
                await self.hv.undefine(defined)
                await self.states.gone(defined, spec.name, "undefined", "clone-failed")
            for disk in made:
                await self._delete_disk(disk)
            raise
