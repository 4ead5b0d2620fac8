"""The inventory: PCI devices with names, IOMMU groups, verdicts, GPUs, host capabilities.

Scanned once in full, then kept current one device at a time (a uevent re-reads only that
device); verdicts are recomputed lazily on the next question::

    inv = Inventory(Sysfs("/sys"))
    inv.scan()
    report = inv.report(host_caps(inv.fs, kvm.probe_in_child()))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from msgspec.structs import replace

from services.hardware import readiness
from services.hardware.pciids import PciIds, load
from services.hardware.sysfs import VFIO, Sysfs
from shared.errors import NotFound
from shared.messages.hardware import (
    DeviceKind,
    HostCaps,
    HwReport,
    IommuGroup,
    Passthrough,
    PciDevice,
    ProbeResult,
)
from shared.validate import pci_address

if TYPE_CHECKING:  # not imported at run time: a report of a tree (the CLI's) runs no probe
    from services.hardware.kvm import ProbeOutcome

Change = Literal["added", "changed", "removed"]


def _hex(text: str) -> int:
    try:
        return int(text or "0", 16)
    except ValueError:
        return 0


class Inventory:
    def __init__(self, fs: Sysfs, ids: PciIds | None = None) -> None:
        self.fs = fs
        self.ids = ids if ids is not None else load()
        self._devices: dict[str, PciDevice] = {}
        self._groups: dict[int, set[str]] = {}
        self._ctx: readiness.Context | None = None  # None: verdicts must be recomputed
        self._verdicts: dict[str, Passthrough] = {}
        self._stale: set[str] = set()  # addresses whose verdicts must be recomputed
        self.iommu = False
        self.iommu_hint = ""
        self.root_disk: str | None = None

    def _named(self, dev: PciDevice) -> PciDevice:
        v, d = _hex(dev.vendor_id), _hex(dev.device_id)
        return replace(
            dev, vendor=self.ids.vendor(v), name=self.ids.device(v, d),
            subsystem=self.ids.subsystem(v, d, _hex(dev.subsystem_vendor_id),
                                         _hex(dev.subsystem_device_id)),
            class_name=self.ids.class_name(_hex(dev.class_code)),
            kind=readiness.kind_of(dev.class_code))

    def scan(self) -> None:
        """Read every device afresh (at start; uevents keep it current after that)."""
        attached = self.fs.attached()
        devices = {}
        for addr in self.fs.addresses():
            try:
                devices[addr] = self._named(self.fs.read_device(addr, attached))
            except NotFound:  # it left between the listing and the read
                continue
        self._devices = devices
        self._groups = {}
        for addr, dev in devices.items():
            if dev.iommu_group is not None:
                self._groups.setdefault(dev.iommu_group, set()).add(addr)
        self.iommu = self.fs.iommu_on()
        cpu = self.fs.cpu()
        self.iommu_hint = "" if self.iommu else readiness.iommu_hint(
            cpu.vendor, hypervisor_guest="hypervisor" in cpu.flags, cmdline=self.fs.cmdline())
        self.root_disk = self.fs.root_disk_address()
        self._ctx = None

    def update(self, addr: str) -> tuple[Change, PciDevice | None]:
        """Re-read one device after a uevent: what happened to it, and its new record.

        Only that device is read. Its verdict (and its group's) is recomputed when what a
        verdict depends on changed; a driver bind or a ``change`` keeps every verdict.
        """
        old = self._devices.get(addr)
        try:
            dev: PciDevice | None = self._named(self.fs.read_device(addr))
        except NotFound:
            dev = None
        self._invalidate(old, dev)
        if dev is None:
            self._devices.pop(addr, None)
            return "removed", None
        self._devices[addr] = dev
        if dev.iommu_group is not None and not self.iommu:
            self.iommu = True
            self._ctx = None
        return ("changed" if old is not None else "added"), self._with_verdict(dev)

    @staticmethod
    def _verdict_key(d: PciDevice | None) -> tuple[object, ...] | None:
        return None if d is None else (d.iommu_group, d.class_code, d.vendor_id, d.boot_vga,
                                       d.physfn, tuple(d.block))

    def _invalidate(self, old: PciDevice | None, new: PciDevice | None) -> None:
        if self._verdict_key(old) == self._verdict_key(new):
            return
        for d in (old, new):
            if d is None:
                continue
            if d.iommu_group is not None:
                members = self._groups.setdefault(d.iommu_group, set())
                members.discard(d.address)
                self._stale |= members
            self._stale.add(d.address)
            c = readiness.class16(d)
            if readiness.is_nic(d) or c in readiness.PLATFORM or d.address == self.root_disk:
                self._ctx = None  # the host's only NIC or a chipset slot may have changed
        if new is not None and new.iommu_group is not None:
            self._groups[new.iommu_group].add(new.address)
        if old is not None and new is None:
            self._verdicts.pop(old.address, None)

    def _assess(self) -> dict[str, Passthrough]:
        if self._ctx is None:
            devices = list(self._devices.values())
            self._ctx = readiness.context(devices, iommu=self.iommu, iommu_hint=self.iommu_hint,
                                          root_disk=self.root_disk)
            self._verdicts = readiness.assess(devices, self._ctx)
        elif self._stale:
            addrs = {a for a in self._stale if a in self._devices}
            for a in list(addrs):
                g = self._devices[a].iommu_group
                if g is not None:
                    addrs |= self._groups.get(g, set())
            for a in self._stale:
                self._verdicts.pop(a, None)
            self._verdicts.update(readiness.assess([self._devices[a] for a in addrs], self._ctx))
        self._stale = set()
        return self._verdicts

    def _with_verdict(self, dev: PciDevice) -> PciDevice:
        return replace(dev, passthrough=self._assess().get(dev.address))

    def devices(self, kind: DeviceKind | None = None) -> list[PciDevice]:
        return [self._with_verdict(d) for a, d in sorted(self._devices.items())
                if kind is None or d.kind == kind]

    def device(self, address: str) -> PciDevice:
        addr = pci_address(address)
        dev = self._devices.get(addr)
        if dev is None:
            raise NotFound(f"no PCI device {addr} on this host (see `phyllome hw list`)")
        return self._with_verdict(dev)

    def groups(self) -> list[IommuGroup]:
        members: dict[int, list[str]] = {}
        for addr, d in sorted(self._devices.items()):
            if d.iommu_group is not None:
                members.setdefault(d.iommu_group, []).append(addr)
        return [IommuGroup(id=g, devices=m) for g, m in sorted(members.items())]

    def group_of(self, address: str) -> list[PciDevice]:
        """The device and every other member of its IOMMU group (bridges included)."""
        dev = self.device(address)
        if dev.iommu_group is None:
            return [dev]
        return [self._with_verdict(self._devices[a])
                for a in sorted(self._groups.get(dev.iommu_group, ()))]

    def report(self, caps: HostCaps) -> HwReport:
        devices = self.devices()
        problems = [f"{d.address}: {p}" for d in devices for p in d.problems]
        return HwReport(host=caps, devices=devices, groups=self.groups(),
                        gpus=readiness.gpu_view(devices), problems=problems)


def _on(value: str | None) -> bool:
    return (value or "").upper() in ("Y", "1")


def host_caps(fs: Sysfs, kvm_ioctl: ProbeOutcome | None,
              boot_probe: ProbeResult = "not-run") -> HostCaps:
    """What this host can do; ``kvm_usable`` follows the VM agent's boot probe alone."""
    cpu = fs.cpu()
    mods = fs.kvm_modules()
    vendor_mod = mods.get("kvm_intel") or mods.get("kvm_amd")
    amd = mods.get("kvm_amd")
    iommu = fs.iommu_on()
    result, detail, ms = (kvm_ioctl.result, kvm_ioctl.detail, kvm_ioctl.ms) if kvm_ioctl else (
        "not-run", "not run on a sysfs tree" if not fs.real else "not run", 0.0)
    return HostCaps(
        arch=cpu.arch,
        cpu_vendor=cpu.vendor, cpu_model=cpu.model,
        virt_extension="vmx" if "vmx" in cpu.flags else "svm" if "svm" in cpu.flags else "",
        hypervisor_guest="hypervisor" in cpu.flags,
        kvm_device=fs.kvm_device(), kvm_modules=sorted(mods),
        kvm_ioctl=result,
        kvm_ioctl_detail=detail, kvm_ioctl_ms=ms,
        kvm_boot_probe=boot_probe, kvm_usable=boot_probe == "passed",
        nested=_on(vendor_mod.get("nested")) if vendor_mod is not None else None,
        iommu=iommu,
        iommu_hint="" if iommu else readiness.iommu_hint(
            cpu.vendor, hypervisor_guest="hypervisor" in cpu.flags, cmdline=fs.cmdline()),
        sev=_on(amd.get("sev")) if amd and "sev" in amd else "sev" in cpu.flags,
        sev_es=_on(amd.get("sev_es")) if amd and "sev_es" in amd else "sev_es" in cpu.flags,
        sev_snp=_on(amd.get("sev_snp")) if amd and "sev_snp" in amd else "sev_snp" in cpu.flags,
        tdx=_on((mods.get("kvm_intel") or {}).get("tdx")),
        sgx="sgx" in cpu.flags,
        vfio_pci_loaded=fs.driver_loaded(VFIO))
