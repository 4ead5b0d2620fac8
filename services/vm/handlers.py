"""The vm endpoints: checks at the edge, then the hypervisor, the peers (catalogue, storage,
hardware) and the VM records (``state.VmStates``, which also bridges hypervisor events to
the bus and reconciles)::

    handlers = Handlers(agent, LibvirtHypervisor(uri), settings, decision, metrics)
    await handlers.begin()
    info = await handlers.start(VmRef(vm="demo"))
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid as uuidlib
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Literal

import msgspec

from services.vm import cloudinit, hostfs, migration
from services.vm.accel import Accel
from services.vm.addresses import AddressWatch
from services.vm.config import Settings
from services.vm.console_bridge import ConsoleBridge, pty_target, tcp_target
from services.vm.hypervisor import Device, Domain, Hypervisor
from services.vm.metrics import VmMetrics
from services.vm.networks import Networks
from services.vm.screenshot import Screens
from services.vm.snapshots import Snapshots
from services.vm.spec import (
    check_disk,
    check_name,
    check_spec,
    check_usb,
    is_pci_address,
    random_mac,
    with_machine,
)
from services.vm.state import RUNNING, STOPPED, VmStates, with_secrets
from shared import archs, placement
from shared.agent import Agent
from shared.errors import (
    ArchMismatch,
    ArchUnsupported,
    BadRequest,
    Conflict,
    InsufficientResources,
    NotFound,
    PhyError,
    Timeout,
    Unavailable,
)
from shared.jobs import Job, succeeded, wait_job
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
from shared.messages.hosts import Problem
from shared.messages.jobs import JobAccepted, JobFinished, JobProgress
from shared.messages.net import NetCreate, NetList, NetRef, Network
from shared.messages.storage import (
    CloneVolume,
    CreateVolume,
    ImportVolume,
    VolumeInfo,
    VolumeQuery,
    VolumeRef,
)
from shared.messages.vm import (
    AcceleratorDecision,
    AcceleratorFallback,
    BackupScheduleList,
    Cdrom,
    ConsoleOpen,
    ConsoleSession,
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
    VmDeviceChanged,
    VmGuestState,
    VmInfo,
    VmInsert,
    VmList,
    VmListRequest,
    VmMigrate,
    VmRecord,
    VmRef,
    VmRestore,
    VmScreenshot,
    VmScreenshotRequest,
    VmShutdown,
    VmSnapshot,
    VmSnapshotCreate,
    VmSnapshotList,
    VmSnapshotRef,
    VmSnapshotRevert,
    VmSpec,
    VmUpdate,
)

log = logging.getLogger("phyllome.vm")

# A VM's spec with one device more or less, that device, and how events name it.
Change = Callable[[VmSpec], tuple[VmSpec, Device, str]]
PEER_TIMEOUT_S = 10.0
# The firmware descriptor feature libvirt looks for, and the OVMF build that has it.
FIRMWARE_FEATURE = {"sev": "amd-sev", "sev-es": "amd-sev-es", "sev-snp": "amd-sev-snp",
                    "tdx": "intel-tdx"}
FIRMWARE_BUILD = {"sev": "OvmfX64", "sev-es": "OvmfX64", "sev-snp": "AmdSev",
                  "tdx": "IntelTdx"}
JOB_TIMEOUT_S = 3600.0
HEALTH_S = 60.0  # how often the host's problems (hypervisor.problems) are checked again


def redacted(spec: VmSpec) -> VmSpec:
    return msgspec.structs.replace(spec, password="********") if spec.password else spec


class Handlers:
    """One vm agent's endpoints over one hypervisor; see the module docstring."""

    def __init__(self, agent: Agent, hypervisor: Hypervisor, settings: Settings,
                 decision: AcceleratorDecision, metrics: VmMetrics) -> None:
        self.agent = agent
        self.host = agent.host
        self.hv = hypervisor
        self.settings = settings
        self.decision = decision
        self.metrics = metrics
        self.states = VmStates(agent, hypervisor, self.metrics)
        self.networks = Networks(hypervisor, nat_subnet=settings.nat_subnet)
        self.addresses = AddressWatch(agent, hypervisor)
        self._network_problem: Problem | None = None
        self.migrations = migration.Migrations(agent, self.states,
                                               Path(settings.migration_dir))
        self.snapshots = Snapshots(self)
        self.consoles = ConsoleBridge(agent.bus.nc, agent.host)
        self.screens = Screens(hypervisor)

    # -- life of the agent ----------------------------------------------------------------

    async def begin(self) -> None:
        """First reconciliation, then the event bridge and the periodic pass."""
        if self.decision.kvm_usable is False:
            await self.agent.publish("accelerator", AcceleratorFallback(
                host=self.host, reason=self.decision.note))
        self.agent.spawn(self._report_probe(), "report-probe")
        if self.hv.connected:
            self._network_problem = await self.networks.ensure_default()
        await self.states.reconcile()
        await self.migrations.recover()
        self.agent.spawn(self.states.bridge(), "events")
        self.agent.spawn(self.states.periodic(self.settings.reconcile_s), "reconcile")
        self.agent.spawn(self._watch_health(), "health")
        self.agent.spawn(self.addresses.run(self.settings.address_poll_s), "addresses")
        await self.snapshots.begin()

    async def close(self) -> None:
        await self.consoles.close()
        await self.hv.close()

    async def _watch_health(self) -> None:
        """Keep the agent's problems (its heartbeat, ``phyllome status``) true to the
        hypervisor's and the default network's; a change is logged and beaten at once."""
        while True:
            try:
                found = await self.hv.problems()
            except PhyError as e:
                log.debug("host problems not checked: %s", e.message)
            else:
                if self._network_problem is not None:
                    found.append(self._network_problem)
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
        here = archs.host_arch()
        if spec.arch != here:  # KVM runs the host's own arch only: QEMU emulates the others
            if spec.accelerator == "kvm":
                raise BadRequest(f"VM {spec.name} is an {spec.arch} guest and KVM runs only "
                                 f"{here} guests here: use --accelerator tcg or auto")
            return "tcg"
        accel = self.decision.accelerator if spec.accelerator == "auto" else spec.accelerator
        if spec.nested and accel != "kvm":
            raise BadRequest(f"nested virtualization needs KVM, and VM {spec.name} would run "
                             f"under TCG ({self.decision.note})")
        if spec.confidential != "none" and accel != "kvm":
            raise BadRequest(f"--confidential {spec.confidential} needs KVM, and VM {spec.name} "
                             f"would run under TCG ({self.decision.note})")
        if spec.cpu == "host-passthrough" and accel != "kvm":
            raise BadRequest(f"--cpu host-passthrough needs KVM, and VM {spec.name} would run "
                             "under TCG: use --cpu maximum, a named model, or leave it out")
        return accel

    async def _check_arch(self, spec: VmSpec) -> None:
        """Refuse a guest of another arch when this host lacks its QEMU or firmware."""
        if spec.arch == archs.host_arch():
            return
        have = await asyncio.to_thread(archs.guest_arch, spec.arch)
        why = archs.missing(spec.arch, have, uefi=spec.firmware == "uefi",
                            secure_boot=spec.secure_boot)
        if why:
            raise ArchUnsupported(f"host {self.host} cannot run VM {spec.name}: {why}")

    @staticmethod
    def _check_image_arch(spec: VmSpec, image: ImageInfo, what: str) -> None:
        """An image is booted only by a guest of its own arch (the pulled file's arch; the
        entry's archs were checked by ``_image``)."""
        built = (image.local.arch if image.local is not None else "") or image.arch
        if built and built != spec.arch:
            raise ArchMismatch(f"{what} {image.entry.id} is an image for {built} and VM "
                               f"{spec.name} is an {spec.arch} guest: give --arch {built}, "
                               "or an image of that arch")

    async def _check_nics(self, nics: list[Nic]) -> None:
        """Refuse a NIC on a network this host does not have (it would not start)."""
        wanted = {n.source for n in nics if n.kind == "network"}
        if not wanted:
            return
        have = {n.name for n in await self.hv.networks()}
        for name in sorted(wanted - have):
            raise NotFound(f"no network {name!r} on {self.host}: `phyllome net list` shows "
                           "them, `phyllome net create` makes one")

    @staticmethod
    def _check_minimum(spec: VmSpec, image: ImageInfo) -> None:
        """What the image's OS needs at least (osinfo's minimum), before any disk is made."""
        low = image.entry.requirements.minimum
        if low.ram and spec.memory_mib * (1 << 20) < low.ram:
            raise BadRequest(f"{image.entry.name} needs at least {low.ram >> 20} MiB of "
                             f"memory and VM {spec.name} has {spec.memory_mib} MiB: give more")
        if low.cpus and spec.vcpus < low.cpus:
            raise BadRequest(f"{image.entry.name} needs at least {low.cpus} vCPUs and VM "
                             f"{spec.name} has {spec.vcpus}: give more with --cpus")

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

    async def _check_devices(self, spec: VmSpec) -> None:
        """Refuse shares, vsock or a confidential mode this host cannot give the VM."""
        for share in spec.shares:
            await asyncio.to_thread(hostfs.check_share_dir, share.source)
        if spec.vsock:
            hostfs.check_vsock()
        mode = spec.confidential
        if mode == "none":
            return
        caps: HostCaps = await self.agent.bus.call(self.host, hardware_api.CAPS, Empty(),
                                                   timeout=PEER_TIMEOUT_S)
        if not placement.confidential(caps, mode):
            raise BadRequest(f"host {self.host} has no {mode.upper()} under a usable KVM (the "
                             "hardware agent's caps: CPU flag, KVM module parameter): "
                             "place the VM on a host that has it, or drop --confidential")
        feature = FIRMWARE_FEATURE[mode]
        if feature not in await asyncio.to_thread(hostfs.firmware_features):
            raise BadRequest(f"host {self.host} has no OVMF build for {mode} (no firmware "
                             f"descriptor with {feature!r} in {', '.join(hostfs.FIRMWARE_DIRS)})"
                             f": install one (OVMF's {FIRMWARE_BUILD[mode]} build)")

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
        return msgspec.structs.replace(spec, disks=[await self._resolve(d) for d in spec.disks])

    async def _resolve(self, disk: Disk) -> Disk:
        if not disk.path:
            vol: VolumeInfo = await self.agent.bus.call(
                self.host, storage_api.INFO,
                VolumeQuery(pool=disk.pool or "default", name=disk.volume),
                timeout=PEER_TIMEOUT_S)
            disk = msgspec.structs.replace(disk, path=vol.path, pool=vol.pool)
        await asyncio.to_thread(hostfs.check_raw, disk.path)
        return disk

    async def _wait_job(self, accepted: JobAccepted,
                        on_progress: Callable[[JobProgress], Awaitable[None]] | None = None,
                        ) -> JobFinished:
        """A storage job this agent's work needs: its outcome, or the error it ended with."""
        return succeeded(await wait_job(self.agent.bus, self.host, "storage", accepted,
                                        timeout=JOB_TIMEOUT_S, on_progress=on_progress))

    async def _copy_disk(self, src: Disk, dst_name: str) -> Disk:
        """A new owned disk with ``src``'s content: via the storage agent for volumes, else
        a local reflink/sparse copy beside the source (or in the disk dir)."""
        bus = self.agent.bus
        if src.volume:
            pool = src.pool or "default"
            accepted = await bus.call(self.host, storage_api.CLONE, CloneVolume(
                pool=pool, name=src.volume, dst_name=dst_name), timeout=PEER_TIMEOUT_S)
            await self._wait_job(accepted)
            vol: VolumeInfo = await bus.call(self.host, storage_api.INFO, VolumeQuery(
                pool=pool, name=dst_name), timeout=PEER_TIMEOUT_S)
            return Disk(path=vol.path, pool=pool, volume=dst_name, bus=src.bus, owned=True)
        path = f"{self.settings.disk_dir}/{dst_name}.raw"
        await hostfs.copy_disk(src.path, path)
        return Disk(path=path, bus=src.bus, owned=True)

    async def _image(self, image: str, what: str = "--image", arch: str = "") -> ImageInfo:
        ref = ImageRef(id=image, arch=arch)
        try:
            info: ImageInfo = await self.agent.bus.call(
                self.host, catalogue_api.INFO, ref, timeout=PEER_TIMEOUT_S)
        except Unavailable as e:
            raise Unavailable(f"{what} needs the catalogue agent ({e.message}); "
                              "or give a path") from None
        if arch and info.entry.archs and arch not in info.entry.archs:
            have = ", ".join(info.entry.archs)
            raise ArchMismatch(f"{what} {image} is an image for {have}, not for {arch} "
                               f"guests: give --arch {info.entry.archs[0]}, or an image of "
                               f"{arch}")
        if not info.path and info.pulling:  # being pulled (a built-in one, at start): wait
            succeeded(await wait_job(self.agent.bus, self.host, "catalogue", info.pulling,
                                     timeout=JOB_TIMEOUT_S))
            info = await self.agent.bus.call(self.host, catalogue_api.INFO, ref,
                                             timeout=PEER_TIMEOUT_S)
        if not info.path:
            flag = f" --arch {arch}" if arch and arch != archs.host_arch() else ""
            raise Conflict(f"image {image}{' for ' + arch if flag else ''} is not on "
                           f"{self.host} yet: run `phyllome images pull {image}{flag}` first")
        return info

    async def _disk_from_image(self, info: ImageInfo, vm_name: str) -> Disk:
        """The image's RAW file (from the catalogue) cloned into a new disk of the VM."""
        bus = self.agent.bus
        image = info.entry.id
        name = f"{vm_name}-disk0"
        try:
            accepted = await bus.call(self.host, storage_api.IMPORT_FILE, ImportVolume(
                pool="default", name=name, source=info.path), timeout=PEER_TIMEOUT_S)
        except Unavailable:
            log.info("no storage agent; copying image %s locally", image)
            return await self._copy_disk(Disk(path=info.path), name)
        await self._wait_job(accepted)
        vol: VolumeInfo = await bus.call(self.host, storage_api.INFO, VolumeQuery(
            pool="default", name=name), timeout=PEER_TIMEOUT_S)
        return Disk(path=vol.path, pool="default", volume=name, owned=True)

    async def _blank_disk(self, vm_name: str, size_bytes: int) -> Disk:
        """A new sparse RAW volume to install an OS onto (``--disk-size``)."""
        name = f"{vm_name}-disk0"
        try:
            vol: VolumeInfo = await self.agent.bus.call(self.host, storage_api.CREATE, CreateVolume(
                pool="default", name=name, size_bytes=size_bytes), timeout=PEER_TIMEOUT_S)
        except Unavailable as e:
            raise Unavailable(f"--disk-size needs the storage agent ({e.message}); or give a "
                              "disk with --disk") from None
        return Disk(path=vol.path, pool=vol.pool, volume=name, owned=True)

    # -- CD-ROMs: install media and the cloud-init seed ---------------------------------

    async def _media(self, path: str, image: str) -> str:
        """The checked ISO of ``--cdrom``: a path, or a pulled catalogue image."""
        if image:
            path = (await self._image(image, "--cdrom IMAGE")).path
        await asyncio.to_thread(hostfs.check_iso, path)
        return path

    def _seed_path(self, uuid: str) -> str:
        """Beside the VM's local disks, named by host too: a migration's source and target
        may share a directory, and each removes only its own."""
        return f"{self.settings.disk_dir}/{uuid}-{self.host}-cidata.iso"

    async def _make_seed(self, spec: VmSpec) -> VmSpec:
        """Write the VM's cloud-init seed (a fresh instance-id unless it has one: a migration
        keeps it) and point the spec at it; nothing without ``cloud_init``."""
        if spec.cloud_init is None:
            return msgspec.structs.replace(spec, seed="")
        ci = spec.cloud_init
        if not ci.instance_id:
            ci = cloudinit.replace_id(ci)
        path = self._seed_path(spec.uuid)
        data = cloudinit.seed_iso(ci)
        await asyncio.to_thread(hostfs.write_seed, path, data)
        return msgspec.structs.replace(spec, cloud_init=ci, seed=path)

    async def _remove_seed(self, spec: VmSpec | None) -> None:
        if spec is not None and spec.seed:
            await asyncio.to_thread(hostfs.remove, spec.seed)

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
        if record is not None and record.host != self.host:  # a copy: it has its own disks
            record = None
        spec = record.spec if record else dom.spec or VmSpec(name=dom.name, uuid=dom.uuid)
        stats = await self.hv.stats(dom.uuid)
        consoles = await self.hv.consoles(dom.uuid) if dom.state in RUNNING else {}
        source, addresses = await self.hv.addresses(dom.uuid) if dom.state in RUNNING \
            and spec.nics else ("", [])
        started = record.started_at if record and dom.state in RUNNING else 0.0
        note = ""
        if dom.accelerator == "tcg":
            note = ("forced by the VM's spec" if spec.accelerator == "tcg"
                    else self.decision.note)
            if spec.arch != archs.host_arch():
                note = (f"an {spec.arch} guest on an {archs.host_arch()} host: QEMU emulates "
                        "its CPU (TCG)")
        return VmInfo(
            name=dom.name, uuid=dom.uuid, host=self.host, state=dom.state, reason=dom.reason,
            accelerator=dom.accelerator, accelerator_note=note,
            uptime_s=round(time.time() - started, 3) if started else 0.0,
            vcpus=spec.vcpus, memory_mib=spec.memory_mib, cpu_time_s=stats.cpu_time_s,
            memory_rss_bytes=stats.memory_rss_bytes, autostart=dom.autostart,
            vnc=consoles.get("vnc"), spice=consoles.get("spice"), addresses=addresses,
            address_source=source, spec=redacted(spec),
            vsock_cid=await self.hv.vsock_cid(dom.uuid) if spec.vsock and dom.state in RUNNING
            else 0)

    # -- endpoints ------------------------------------------------------------------------

    async def create(self, req: VmCreate) -> VmInfo:
        with self.metrics.operation("create"):
            spec = msgspec.structs.replace(req.spec, seed="")  # the agent makes its own
            if not spec.uuid:
                spec = msgspec.structs.replace(spec, uuid=str(uuidlib.uuid4()))
            spec = with_machine(spec)
            check_spec(spec)
            self._accelerator(spec)
            await self._check_arch(spec)
            await self._check_nested(spec)
            await self._check_devices(spec)
            await self._refuse_duplicate(spec)
            await self.states.refuse_foreign(spec.uuid, spec.name)
            await self._check_memory(spec)
            await self._check_hostdevs(spec.hostdevs)
            await self._check_usb(spec.usb_hostdevs)
            await self._check_nics(spec.nics)
            if req.image and req.disk_size_bytes:
                raise BadRequest("--image gives the VM its disk already: drop --disk-size")
            if req.disk_size_bytes < 0:
                raise BadRequest("--disk-size must be positive, such as 20G")
            image = await self._image(req.image, arch=spec.arch) if req.image else None
            if image is not None:
                self._check_image_arch(spec, image, "--image")
                if image.local is not None and image.local.source_format == "iso":
                    raise BadRequest(f"{req.image} is install media: boot it with --cdrom "
                                     f"{req.image} --disk-size 20G")
                self._check_minimum(spec, image)
            media = await self._image(req.cdrom_image, "--cdrom IMAGE", spec.arch) \
                if req.cdrom_image else None
            if media is not None:
                self._check_image_arch(spec, media, "--cdrom")
                spec = msgspec.structs.replace(spec, cdrom=Cdrom(path=media.path))
            for info in (image, media):
                if info is not None and info.template.profile != "generic":
                    spec = msgspec.structs.replace(spec, profile=info.template.profile)
            if spec.cdrom is not None and spec.cdrom.path:
                await asyncio.to_thread(hostfs.check_iso, spec.cdrom.path)
            spec = await self._resolve_disks(spec)
            spec = msgspec.structs.replace(spec, nics=[
                n if n.mac else msgspec.structs.replace(n, mac=random_mac()) for n in spec.nics])
            made: list[Disk] = []
            try:
                if image is not None:
                    made.append(await self._disk_from_image(image, spec.name))
                elif req.disk_size_bytes:
                    made.append(await self._blank_disk(spec.name, req.disk_size_bytes))
                spec = msgspec.structs.replace(spec, disks=[*made, *spec.disks])
                spec = await self._make_seed(spec)
                dom = await self._define(spec)
                try:
                    if spec.autostart:
                        await self.hv.set_autostart(dom.uuid, True)
                    await self.states.write(spec, dom)
                except BaseException:
                    await self.hv.undefine(dom.uuid)
                    raise
            except BaseException:
                for disk in made:
                    await self._delete_disk(disk)
                await self._remove_seed(spec)
                raise
            log.info("defined VM %s (%s)", spec.name, spec.uuid)
            return await self._info(dom.uuid)

    async def start(self, req: VmRef) -> VmInfo:
        with self.metrics.operation("start"):
            dom = await self.hv.domain(req.vm)
            if dom.state not in STOPPED:
                raise Conflict(f"VM {dom.name} is {dom.state} already")
            if snapshot := self.snapshots.unfinished(dom.uuid):
                raise Conflict(f"VM {dom.name} is being reverted to snapshot {snapshot} (the "
                               "agent stopped during the revert and finishes it once the "
                               "storage agent answers); start it after that")
            hostfs.ensure_dir(self.settings.console_dir)
            async with self.states.owned(dom.uuid, dom.name, "start"):
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
            async with self.states.owned(dom.uuid, dom.name, "delete", stray_ok=True):
                return await self._delete(dom, req)

    async def _delete(self, dom: Domain, req: VmDelete) -> Ack:
        if dom.state not in STOPPED:
            if not req.force:
                raise Conflict(f"VM {dom.name} is {dom.state}: stop it first, or delete "
                               "with --force")
            await self.hv.destroy(dom.uuid)
        record, _ = await self.states.load(dom.uuid)
        spec = record.spec if record and record.host == self.host else dom.spec
        await self.snapshots.forget(dom, spec)
        await self.hv.undefine(dom.uuid)
        await self.states.gone(dom.uuid, dom.name, "undefined", "removed")
        await asyncio.to_thread(hostfs.remove, self._console_log(dom.uuid))
        await self._remove_seed(dom.spec)
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
            async with self.states.owned(dom.uuid, dom.name, "update"):
                return await self._update(dom, req)

    async def _update(self, dom: Domain, req: VmUpdate) -> VmInfo:
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
        await self._check_devices(spec)
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

    async def screenshot(self, req: VmScreenshotRequest) -> VmScreenshot:
        """A running VM's screen as a small PNG (``screenshot``)."""
        return await self.screens.take(req)

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
        """Cold migration to ``req.to``, a job run here (see ``services.vm.migration``)."""
        dom = await self.hv.domain(req.vm)
        await self.snapshots.refuse_migration(dom)
        record, _ = await self.states.load(dom.uuid)
        if record is not None and record.spec.confidential != "none":
            raise BadRequest(f"VM {dom.name} is a {record.spec.confidential} guest, bound to "
                             "this host's secure processor: it cannot migrate")

        async def work(job: Job) -> dict[str, object]:
            with self.metrics.operation("migrate"), self.snapshots.migrating(dom.uuid):
                return await self.migrations.migrate(req, job)

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
            cloud_init=base.cloud_init and cloudinit.replace_id(base.cloud_init), seed="",
            autostart=False)
        await self._refuse_duplicate(spec)

        async def work(job: Job) -> dict[str, object]:
            with self.metrics.operation("clone"):
                return await self._clone(job, src, spec)

        return self.agent.jobs.start("clone", work, key=f"clone:{src.uuid}:{req.name}")

    async def _clone(self, job: Job, src: Domain, spec: VmSpec) -> dict[str, object]:
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
            spec = await self._make_seed(msgspec.structs.replace(spec, disks=disks))
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
            await self._remove_seed(spec)
            raise

    # -- networks ---------------------------------------------------------------------------

    async def net_list(self, req: Empty) -> NetList:
        return await self.networks.net_list(req)

    async def net_create(self, req: NetCreate) -> Network:
        with self.metrics.operation("net_create"):
            return await self.networks.net_create(req)

    async def net_delete(self, req: NetRef) -> Ack:
        with self.metrics.operation("net_delete"):
            users = [d.name for d in await self.hv.domains() if d.spec is not None and any(
                n.kind == "network" and n.source == req.name for n in d.spec.nics)]
            return await self.networks.net_delete(req, users)

    # -- devices after create ---------------------------------------------------------------

    async def _check_usb(self, devices: Sequence[UsbHostdev]) -> None:
        """Refuse a vendor:product the hardware agent's inventory does not list (a
        bus.device is libvirt's to check: the inventory names ports, not numbers)."""
        wanted = {(u.vendor, u.product) for u in devices if u.vendor}
        if not wanted:
            return
        try:
            found: DeviceList = await self.agent.bus.call(self.host, hardware_api.LIST,
                                                          DeviceQuery(), timeout=PEER_TIMEOUT_S)
        except Unavailable as e:
            raise Unavailable(f"USB passthrough needs the hardware agent's inventory, and it "
                              f"does not answer ({e.message})") from None
        listed = {(u.vendor_id.lower(), u.product_id.lower())
                  for d in found.devices for u in d.usb}
        for vendor, product in sorted(wanted - listed):
            raise NotFound(f"no USB device {vendor}:{product} on {self.host}; `phyllome hw "
                           "list` shows the host's USB devices")

    async def _change_devices(self, ref: str, action: Literal["attached", "detached"],
                              kind: Literal["disk", "nic", "usb"], change: Change) -> VmInfo:
        """Give a VM its spec with one device more or less (``change`` makes it from the
        current one and names the device): a stopped VM is redefined, a running one gets the
        device live and in its definition (the hypervisor leaves the definition alone when
        the live change fails). Then the record in KV and the event."""
        verb = "attach" if action == "attached" else "detach"
        with self.metrics.operation(f"{verb}_{kind}"):
            dom = await self.hv.domain(ref)
            record, _ = await self.states.load(dom.uuid)
            old = await self._spec_with_secrets(record, dom)
            if old is None:
                raise NotFound(f"VM {dom.name} was not made by Phyllome; it has no spec")
            spec, device, label = change(old)
            check_spec(spec)
            live = dom.state not in STOPPED
            if not live:
                dom = await self._define(spec)
            elif action == "attached":
                await self.hv.attach(dom.uuid, spec, device)
            else:
                await self.hv.detach(dom.uuid, spec, device)
            await self.states.write(spec, dom, revision=(record.revision if record else 1) + 1)
            log.info("VM %s: %s %s %s%s", dom.name, action, kind, label, " (live)" * live)
            await self.agent.publish("device", VmDeviceChanged(
                host=self.host, uuid=dom.uuid, name=dom.name, action=action, kind=kind,
                device=label, live=live), dom.uuid)
            return await self._info(dom.uuid)

    async def attach_disk(self, req: VmAttachDisk) -> VmInfo:
        disk = await self._resolve(check_disk(msgspec.structs.replace(req.disk, owned=False)))

        def change(spec: VmSpec) -> tuple[VmSpec, Device, str]:
            if any(d.path == disk.path for d in spec.disks):
                raise Conflict(f"VM {spec.name} has disk {disk.path} already")
            return msgspec.structs.replace(spec, disks=[*spec.disks, disk]), disk, disk.path

        return await self._change_devices(req.vm, "attached", "disk", change)

    async def detach_disk(self, req: VmDetachDisk) -> VmInfo:
        def change(spec: VmSpec) -> tuple[VmSpec, Device, str]:
            for disk in spec.disks:
                if req.disk in (disk.path, disk.volume, f"{disk.pool}/{disk.volume}"):
                    rest = [d for d in spec.disks if d is not disk]
                    return msgspec.structs.replace(spec, disks=rest), disk, disk.path
            listed = ", ".join(d.path for d in spec.disks) or "none"
            raise NotFound(f"VM {spec.name} has no disk {req.disk!r} (its disks: {listed})")

        return await self._change_devices(req.vm, "detached", "disk", change)

    async def attach_nic(self, req: VmAttachNic) -> VmInfo:
        nic = req.nic if req.nic.mac else msgspec.structs.replace(req.nic, mac=random_mac())
        await self._check_nics([nic])

        def change(spec: VmSpec) -> tuple[VmSpec, Device, str]:
            if any(n.mac.lower() == nic.mac.lower() for n in spec.nics):
                raise Conflict(f"VM {spec.name} has a NIC with MAC {nic.mac} already")
            return msgspec.structs.replace(spec, nics=[*spec.nics, nic]), nic, nic.mac

        return await self._change_devices(req.vm, "attached", "nic", change)

    async def detach_nic(self, req: VmDetachNic) -> VmInfo:
        def change(spec: VmSpec) -> tuple[VmSpec, Device, str]:
            for nic in spec.nics:
                if nic.mac.lower() == req.mac.lower():
                    rest = [n for n in spec.nics if n is not nic]
                    return msgspec.structs.replace(spec, nics=rest), nic, nic.mac
            listed = ", ".join(n.mac for n in spec.nics) or "none"
            raise NotFound(f"VM {spec.name} has no NIC with MAC {req.mac} (its NICs: {listed})")

        return await self._change_devices(req.vm, "detached", "nic", change)

    async def attach_usb(self, req: VmAttachUsb) -> VmInfo:
        usb = check_usb(req.device)
        await self._check_usb([usb])

        def change(spec: VmSpec) -> tuple[VmSpec, Device, str]:
            if usb in spec.usb_hostdevs:
                raise Conflict(f"VM {spec.name} has USB device {usb.label()} already")
            return (msgspec.structs.replace(spec, usb_hostdevs=[*spec.usb_hostdevs, usb]), usb,
                    usb.label())

        return await self._change_devices(req.vm, "attached", "usb", change)

    async def detach_usb(self, req: VmDetachUsb) -> VmInfo:
        usb = req.device

        def change(spec: VmSpec) -> tuple[VmSpec, Device, str]:
            if usb not in spec.usb_hostdevs:
                listed = ", ".join(u.label() for u in spec.usb_hostdevs) or "none"
                raise NotFound(f"VM {spec.name} has no USB device {usb.label()} (its USB "
                               f"devices: {listed})")
            rest = [u for u in spec.usb_hostdevs if u != usb]
            return msgspec.structs.replace(spec, usb_hostdevs=rest), usb, usb.label()

        return await self._change_devices(req.vm, "detached", "usb", change)

    # -- snapshots, backups, restores (services/vm/snapshots.py) ---------------------------

    async def snapshot_create(self, req: VmSnapshotCreate) -> VmSnapshot:
        with self.metrics.operation("snapshot"):
            return await self.snapshots.create(req)

    async def snapshot_list(self, req: VmSnapshotRef) -> VmSnapshotList:
        return await self.snapshots.listing(req)

    async def snapshot_revert(self, req: VmSnapshotRevert) -> VmInfo:
        with self.metrics.operation("revert"):
            return await self.snapshots.revert(req)

    async def snapshot_delete(self, req: VmSnapshotRef) -> Ack:
        return await self.snapshots.delete(req)

    async def backup(self, req: VmBackup) -> JobAccepted:
        return await self.snapshots.backup(req)

    async def restore(self, req: VmRestore) -> JobAccepted:
        return await self.snapshots.restore(req)

    async def schedule_backup(self, req: VmBackupSchedule) -> BackupScheduleList:
        return await self.snapshots.schedule(req)

    async def backup_schedules(self, req: Empty) -> BackupScheduleList:
        return await self.snapshots.schedules()

    # -- install media ----------------------------------------------------------------------

    async def _change_media(self, ref: str, path: str) -> VmInfo:
        """The CD-ROM drive with ``path`` in it ('' empties it): a stopped VM is redefined, a
        running one gets the change live and in its definition."""
        with self.metrics.operation("insert" if path else "eject"):
            dom = await self.hv.domain(ref)
            async with self.states.owned(dom.uuid, dom.name, "insert" if path else "eject"):
                record, _ = await self.states.load(dom.uuid)
                old = await self._spec_with_secrets(record, dom)
                if old is None:
                    raise NotFound(f"VM {dom.name} was not made by Phyllome; it has no spec")
                if old.cdrom is None:
                    raise Conflict(f"VM {dom.name} has no CD-ROM drive: create it with --cdrom")
                if old.cdrom.path == path:
                    return await self._info(dom.uuid)
                spec = msgspec.structs.replace(old, cdrom=Cdrom(path=path))
                check_spec(spec)
                live = dom.state not in STOPPED
                if live:
                    await self.hv.change_media(dom.uuid, spec)
                else:
                    dom = await self._define(spec)
                await self.states.write(spec, dom,
                                        revision=(record.revision if record else 1) + 1)
            action: Literal["attached", "detached"] = "attached" if path else "detached"
            label = path or old.cdrom.path
            log.info("VM %s: %s %s%s", dom.name, "inserted" if path else "ejected", label,
                     " (live)" * live)
            await self.agent.publish("device", VmDeviceChanged(
                host=self.host, uuid=dom.uuid, name=dom.name, action=action, kind="cdrom",
                device=label, live=live), dom.uuid)
            return await self._info(dom.uuid)

    async def eject(self, req: VmRef) -> VmInfo:
        return await self._change_media(req.vm, "")

    async def insert(self, req: VmInsert) -> VmInfo:
        if bool(req.path) == bool(req.image):
            raise BadRequest("give the ISO as a path or as a catalogue image, one of them")
        if req.path and not req.path.startswith("/"):
            raise BadRequest(f"ISO path {req.path!r} must be absolute")
        return await self._change_media(req.vm, await self._media(req.path, req.image))
