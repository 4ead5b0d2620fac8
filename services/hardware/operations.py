"""VFIO bind and release of whole groups (with rollback), mdev create/remove, SR-IOV VFs.

The checks run when the request arrives (so a refusal is the reply, not a failed job);
the sysfs writes run in a job, each in a thread with a deadline (``Sysfs.write_bounded``):
a write the driver blocks fails the job and is rolled back like any failed step. Each group
has one operation at a time: a second bind of a group that is being bound gets Conflict at
once. Original drivers are kept in
``<state_dir>/hardware/vfio.json`` so that release works after a restart, and a bind cut
short by a crash is rolled back at the next start::

    ops = Operations(fs, inventory, state_dir / "hardware")
    await ops.recover()                                           # at start
    devices = ops.plan_bind(BindRequest(address="0000:01:00.0"))   # raises when refused
    result = await ops.bind(devices, progress, single_gpu=False)  # writes, rolls back on error
"""

from __future__ import annotations

import logging
import os
import uuid as uuidlib
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgspec

from services.hardware import readiness
from services.hardware.inventory import Inventory
from services.hardware.sysfs import VFIO, Sysfs
from shared.errors import (
    BackendError,
    BadRequest,
    Conflict,
    Forbidden,
    InsufficientResources,
    InvalidName,
    NotFound,
    PhyError,
    Unavailable,
)
from shared.messages.hardware import BindRequest, MdevCreate, MdevInfo, PciDevice
from shared.validate import pci_address

log = logging.getLogger("phyllome.hardware.ops")
Progress = Callable[[int, int, str], Awaitable[None]]


class Binding(msgspec.Struct, kw_only=True):
    """What a bind changed, to undo it: original drivers, unbound consoles/framebuffers."""

    state: str  # binding | bound
    drivers: dict[str, str]  # address -> original driver ("" = none)
    consoles: list[str] = []
    framebuffers: list[str] = []


class Store:
    """The bindings by group, in a JSON file written atomically (rename)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.bindings: dict[str, Binding] = {}
        if path is not None and path.exists():
            try:
                self.bindings = msgspec.json.decode(path.read_bytes(), type=dict[str, Binding])
            except (msgspec.DecodeError, msgspec.ValidationError) as e:
                log.error("ignoring unreadable %s: %s", path, e)

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_bytes(msgspec.json.encode(self.bindings))
        os.replace(tmp, self.path)


class Operations:
    def __init__(self, fs: Sysfs, inventory: Inventory, state_dir: Path | None) -> None:
        self.fs = fs
        self.inv = inventory
        self.store = Store(state_dir / "vfio.json" if state_dir is not None else None)
        self._busy: dict[str, str] = {}

    # -- checks -------------------------------------------------------------------------------

    def fresh(self, address: str) -> PciDevice:
        """The device as sysfs shows it now (it may have gone since the last scan)."""
        addr = pci_address(address)
        self.fs.refuse_if_stuck(addr)
        change, dev = self.inv.update(addr)
        if dev is None:
            raise NotFound(f"no PCI device {addr} on this host"
                           + (" (it has gone since the last scan)" if change == "removed" else "")
                           + "; see `phyllome hw list`")
        return dev

    def _in_use(self, dev: PciDevice) -> None:
        if dev.iommu_group is not None and (users := self.fs.vfio_users(dev.iommu_group)):
            raise Conflict(f"{dev.address} is in use by {', '.join(users)} (IOMMU group "
                           f"{dev.iommu_group} is open): stop that VM first")

    def claim(self, key: str, what: str) -> None:
        """Hold ``key`` (e.g. "IOMMU group 1") for one operation; refused at once while held."""
        if key in self._busy:
            raise Conflict(f"{key} is busy ({self._busy[key]}); wait for that to finish and "
                           "try again")
        self._busy[key] = what

    def unclaim(self, key: str) -> None:
        self._busy.pop(key, None)

    def plan_bind(self, req: BindRequest) -> list[PciDevice]:
        """The devices a bind would move to vfio-pci, or the reason it is refused."""
        dev = self.fresh(req.address)
        if readiness.is_bridge(dev):
            raise BadRequest(f"{dev.address} is a PCI bridge: bind the devices behind it")
        pt = dev.passthrough
        if dev.iommu_group is None or pt is None or pt.verdict == "no-iommu":
            raise Conflict(f"{dev.address} has no IOMMU group: " + (
                pt.reasons[0] if pt and pt.reasons else "turn the IOMMU on"))
        if not self.fs.driver_loaded(VFIO):
            raise Unavailable("the vfio-pci driver is not loaded: run `modprobe vfio-pci` "
                              "(and add it to /etc/modules-load.d) and try again")
        if pt.verdict == "shared-group" and not req.force:
            raise Forbidden(f"{dev.address} shares IOMMU group {dev.iommu_group} with unrelated "
                            f"devices {', '.join(pt.shares_with)}: binding would take them all "
                            "from the host; pass --force to bind the whole group")
        members = [dev, *(self.inv.device(a) for a in pt.companions + pt.shares_with)]
        for m in members:
            self.fs.refuse_if_stuck(m.address)
            if m.address == self.inv.root_disk:
                raise Forbidden(f"{m.address} holds the host's root filesystem: it cannot be "
                                "passed through, not even with --force")
            if m.boot_vga and not req.single_gpu:
                raise Forbidden(f"{m.address} is the host's boot GPU: binding it takes the "
                                "host's display; ask for single-GPU mode (--single-gpu) to "
                                "hand it over")
        self._in_use(dev)
        return sorted(members, key=lambda m: m.address)

    # -- bind / release -----------------------------------------------------------------------

    async def bind(self, devices: list[PciDevice], progress: Progress, *,
                   single_gpu: bool = False) -> dict[str, object]:
        """Move ``devices`` (one group) to vfio-pci; on any failure undo every step done."""
        key = str(devices[0].iommu_group)
        old = self.store.bindings.get(key)
        binding = Binding(state="binding", drivers=dict(old.drivers) if old else {})
        self.store.bindings[key] = binding
        self.store.save()
        steps: list[str] = []
        touched = Binding(state="binding", drivers={})  # what this bind changed, to undo
        step = "start"
        try:
            if single_gpu and any(d.boot_vga for d in devices):
                step = "unbind the consoles"
                touched.consoles, touched.framebuffers = await self._release_consoles(steps)
                binding.consoles, binding.framebuffers = touched.consoles, touched.framebuffers
                self.store.save()
            for i, dev in enumerate(devices):
                addr = dev.address
                orig = self.fs.driver(addr)
                if orig == VFIO:  # bound before (by us or by hand): leave it
                    binding.drivers.setdefault(addr, "")
                    continue
                binding.drivers[addr] = touched.drivers[addr] = orig
                self.store.save()
                step = f"set driver_override of {addr}"
                await self._write(steps, f"bus/pci/devices/{addr}/driver_override", VFIO)
                if orig:
                    step = f"unbind {addr} from {orig}"
                    await self._write(steps, f"bus/pci/drivers/{orig}/unbind", addr)
                step = f"probe {addr}"
                await self._write(steps, "bus/pci/drivers_probe", addr)
                now = self.fs.driver(addr)
                if now != VFIO:
                    raise BackendError(f"{addr} is on {now or 'no driver'} after the probe, "
                                       "not vfio-pci")
                await progress(i + 1, len(devices), f"{addr} -> vfio-pci")
        except BaseException as e:  # cancelled, refused or stuck in the kernel, a bug: undo all
            failed = await self._undo(touched)
            del self.store.bindings[key]
            if old is not None:
                self.store.bindings[key] = old
            self.store.save()
            self._refresh(devices)
            if not isinstance(e, PhyError | OSError):
                raise
            why = e.message if isinstance(e, PhyError) else str(e)
            raise BackendError(
                f"bind of IOMMU group {key} failed at '{step}': {why}; "
                + (f"rolled back {len(steps)} step(s)" if not failed else
                   f"could NOT undo: {'; '.join(failed)}")) from None
        binding.state = "bound"
        self.store.save()
        self._refresh(devices)
        return {"group": int(key), "devices": [d.address for d in devices],
                "original_drivers": dict(binding.drivers), "steps": steps}

    def plan_release(self, address: str) -> tuple[str, Binding]:
        dev = self.fresh(address)
        key = str(dev.iommu_group)
        binding = self.store.bindings.get(key)
        if binding is None:
            if self.fs.driver(dev.address) != VFIO:
                raise Conflict(f"{dev.address} is not bound to vfio-pci (driver: "
                               f"{dev.driver or 'none'}): nothing to release")
            # bound by someone else (libvirt, a script): give it back to the kernel's choice
            binding = Binding(state="bound", drivers={
                m.address: "" for m in self.inv.group_of(dev.address)
                if self.fs.driver(m.address) == VFIO})
        self._in_use(dev)
        return key, binding

    async def release(self, key: str, binding: Binding, progress: Progress) -> dict[str, object]:
        failed = await self._undo(binding, probe_unknown=True)
        devices = sorted(binding.drivers)
        for addr in devices:
            self.inv.update(addr)
        if failed:
            raise BackendError(f"release of IOMMU group {key} incomplete: {'; '.join(failed)}")
        self.store.bindings.pop(key, None)
        self.store.save()
        await progress(len(devices), len(devices), "released")
        return {"group": int(key) if key.isdigit() else key, "devices": devices,
                "drivers": {a: self.fs.driver(a) for a in devices}}

    async def recover(self) -> list[str]:
        """Roll back binds a crash cut short (state ``binding``); returns what was undone."""
        undone = []
        for key, binding in list(self.store.bindings.items()):
            if binding.state != "binding":
                continue
            failed = await self._undo(binding)
            log.warning("rolled back the interrupted bind of IOMMU group %s%s", key,
                        f" (could not undo: {failed})" if failed else "")
            for addr in binding.drivers:
                self.inv.update(addr)
            del self.store.bindings[key]
            undone.append(key)
        self.store.save()
        return undone

    async def _undo(self, binding: Binding, probe_unknown: bool = False) -> list[str]:
        """Give each device back its original driver, in reverse order; failures as text."""
        failed = []
        for addr, orig in reversed(list(binding.drivers.items())):
            try:
                await self._restore(addr, orig, probe_unknown)
            except (PhyError, OSError) as e:
                failed.append(f"{addr}: {e.message if isinstance(e, PhyError) else e}")
        for fb in binding.framebuffers:
            try:
                await self.fs.write_bounded(f"bus/platform/drivers/{fb.split('.')[0]}/bind", fb)
            except PhyError as e:
                failed.append(f"{fb}: {e.message}")
        for con in binding.consoles:
            try:
                await self.fs.write_bounded(f"class/vtconsole/{con}/bind", "1")
            except PhyError as e:
                failed.append(f"{con}: {e.message}")
        return failed

    async def _restore(self, addr: str, orig: str, probe_unknown: bool) -> None:
        if not self.fs.exists(f"bus/pci/devices/{addr}"):
            return  # it has gone: nothing to give back
        cur = self.fs.driver(addr)
        if cur and cur != orig:
            await self.fs.write_bounded(f"bus/pci/drivers/{cur}/unbind", addr)
        await self.fs.write_bounded(f"bus/pci/devices/{addr}/driver_override", "\n")
        if orig and self.fs.driver(addr) != orig:
            await self.fs.write_bounded(f"bus/pci/drivers/{orig}/bind", addr)
        elif not orig and probe_unknown:
            await self.fs.write_bounded("bus/pci/drivers_probe", addr)

    async def _release_consoles(self, steps: list[str]) -> tuple[list[str], list[str]]:
        consoles = []
        for con in sorted(self.fs.listdir("class/vtconsole")):
            if self.fs.attr(f"class/vtconsole/{con}/bind") == "1":
                await self._write(steps, f"class/vtconsole/{con}/bind", "0")
                consoles.append(con)
        fbs = []
        for drv in ("efi-framebuffer", "simple-framebuffer"):
            for name in self.fs.listdir(f"bus/platform/drivers/{drv}"):
                if name.startswith(f"{drv}."):
                    await self._write(steps, f"bus/platform/drivers/{drv}/unbind", name)
                    fbs.append(name)
        return consoles, fbs

    async def _write(self, steps: list[str], rel: str, value: str) -> None:
        await self.fs.write_bounded(rel, value)
        steps.append(f"{value.strip()} > {rel}")

    def _refresh(self, devices: list[PciDevice]) -> None:
        for d in devices:
            self.inv.update(d.address)

    # -- mdev -----------------------------------------------------------------------------------

    async def mdev_create(self, req: MdevCreate) -> MdevInfo:
        dev = self.fresh(req.address)
        types = {t.id: t for t in dev.mdev_types}
        if not types:
            raise BadRequest(f"{dev.address} offers no mediated device types")
        mtype = types.get(req.mdev_type)
        if mtype is None:
            raise NotFound(f"{dev.address} has no mdev type {req.mdev_type!r}; it offers "
                           f"{', '.join(sorted(types))}")
        if mtype.available_instances < 1:
            raise InsufficientResources(
                f"mdev type {mtype.id} of {dev.address} has no instance left "
                f"({len(mtype.instances)} in use): remove one or pick another type")
        mdev_uuid = _uuid(req.uuid) if req.uuid else str(uuidlib.uuid4())
        if self.fs.exists(f"bus/mdev/devices/{mdev_uuid}"):
            raise Conflict(f"a mediated device {mdev_uuid} exists already")
        await self.fs.write_bounded(
            f"bus/pci/devices/{dev.address}/mdev_supported_types/{mtype.id}/create", mdev_uuid)
        if not self.fs.exists(f"bus/mdev/devices/{mdev_uuid}"):
            raise BackendError(f"the kernel accepted mdev {mdev_uuid} but did not create it")
        self.inv.update(dev.address)
        return MdevInfo(uuid=mdev_uuid, parent=dev.address, mdev_type=mtype.id)

    async def mdev_remove(self, mdev_uuid: str) -> MdevInfo:
        mdev_uuid = _uuid(mdev_uuid)
        rel = f"bus/mdev/devices/{mdev_uuid}"
        if not self.fs.exists(rel):
            raise NotFound(f"no mediated device {mdev_uuid} (see `phyllome hw mdev types`)")
        real = os.path.realpath(self.fs.path(rel))
        parent = os.path.basename(os.path.dirname(real))
        mtype = self.fs.link_name(f"{rel}/mdev_type") or ""
        group = self.fs.link_name(f"{rel}/iommu_group")
        if group is not None and (users := self.fs.vfio_users(int(group))):
            raise Conflict(f"mediated device {mdev_uuid} is in use by {', '.join(users)}")
        await self.fs.write_bounded(f"{rel}/remove", "1")
        self.inv.update(parent)
        return MdevInfo(uuid=mdev_uuid, parent=parent, mdev_type=mtype)

    # -- SR-IOV ---------------------------------------------------------------------------------

    async def sriov_set(self, address: str, num_vfs: int) -> PciDevice:
        dev = self.fresh(address)
        if not dev.sriov_totalvfs:
            raise BadRequest(f"{dev.address} does not support SR-IOV (no sriov_totalvfs)")
        if not 0 <= num_vfs <= dev.sriov_totalvfs:
            raise BadRequest(f"{dev.address} supports 0 to {dev.sriov_totalvfs} VFs, "
                             f"not {num_vfs}")
        for vf in dev.virtfns:
            self._in_use(self.inv.device(vf))
        rel = f"bus/pci/devices/{dev.address}/sriov_numvfs"
        before = dev.sriov_numvfs
        if before and num_vfs and num_vfs != before:
            await self.fs.write_bounded(rel, "0")  # the kernel changes a count only through 0
        try:
            await self.fs.write_bounded(rel, str(num_vfs))
        except PhyError:
            if before and num_vfs != before and dev.address not in self.fs.stuck:
                await self.fs.write_bounded(rel, str(before))
            raise
        for vf in dev.virtfns:
            self.inv.update(vf)
        pf = self.fresh(dev.address)
        for vf in pf.virtfns:
            self.inv.update(vf)
        return self.inv.device(dev.address)


def _uuid(text: str) -> str:
    try:
        return str(uuidlib.UUID(text))
    except (ValueError, AttributeError, TypeError):
        raise InvalidName(f"{text!r} is not a UUID (e.g. {uuidlib.uuid4()})") from None

