"""Fake sysfs trees laid out as the kernel lays them out, built from short descriptions.

The hardware agent reads everything under a root (``PHYLLOME_SYSFS_ROOT``); these trees let
the same code run on hosts this machine is not: an Intel desktop with an NVIDIA GPU, an AMD
chipset group, an SR-IOV NIC, GVT-g mdev types, a host with the IOMMU off, one with the
IOMMU on and a device it leaves out::

    >>> import tempfile
    >>> root = build(tempfile.mkdtemp(), intel_desktop()).root
    >>> sorted(p.name for p in (root / "kernel/iommu_groups/1/devices").iterdir())
    ['0000:00:01.0', '0000:01:00.0', '0000:01:00.1', '0000:01:00.2', '0000:01:00.3']

What the kernel does in reply to a write (unbind, drivers_probe, sriov_numvfs, mdev create)
is played by ``TreeKernel``, which the adapter calls after each write it makes on a tree.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

# x86 feature numbers as in the kernel's cpufeatures.h (word * 32 + bit), used in the cpu
# modalias; these have not moved in a decade.
FEATURES = {"vmx": 4 * 32 + 5, "hypervisor": 4 * 32 + 31, "svm": 6 * 32 + 2,
            "sgx": 9 * 32 + 2, "sev": 19 * 32 + 1, "sev_es": 19 * 32 + 3,
            "sev_snp": 19 * 32 + 4}
VENDOR_CODES = {"intel": 0, "amd": 2}

DRIVERS_ALWAYS = ("pcieport", "vfio-pci")


@dataclass
class Usb:
    """A USB device on a controller's root hub (``port`` is its sysfs name, e.g. ``1-3``)."""

    port: str
    vendor: int
    product: int
    manufacturer: str = ""
    name: str = ""
    device_class: int = 0
    interface_classes: tuple[int, ...] = (0x03,)
    driver: str = "usbhid"


@dataclass
class MdevType:
    """One ``mdev_supported_types/<id>`` entry, with ``instances`` already created."""

    id: str
    name: str
    description: str
    available: int
    device_api: str = "vfio-pci"
    instances: tuple[str, ...] = ()


@dataclass
class Pci:
    """One PCI function; ``parent`` is the address of the bridge it sits behind."""

    addr: str
    vendor: int
    device: int
    cls: int
    subsys: tuple[int, int] = (0, 0)
    driver: str | None = None
    group: int | None = None
    parent: str | None = None
    boot_vga: bool = False
    numa_node: int = -1
    reset_method: str | None = "flr bus"
    revision: int = 0xA1
    sriov_totalvfs: int = 0
    sriov_numvfs: int = 0
    vf_device: int = 0
    vf_driver: str | None = None
    vf_offset: int = 0x80
    vf_stride: int = 2
    mdev_types: tuple[MdevType, ...] = ()
    usb: tuple[Usb, ...] = ()
    block: tuple[tuple[str, str], ...] = ()  # (name, "major:minor")
    net: tuple[str, ...] = ()


@dataclass
class Host:
    """A whole machine: its CPU, IOMMU, KVM modules and PCI functions."""

    name: str
    cpu_vendor: str
    cpu_flags: tuple[str, ...]
    devices: list[Pci]
    iommu: tuple[str, ...] = ()  # class/iommu entries, e.g. ("dmar0",) or ("ivhd0",)
    kvm_modules: dict[str, dict[str, str]] = field(default_factory=dict)
    root_dev: str | None = None  # "major:minor" of the block device holding "/"
    consoles: bool = False  # vtcon0 (dummy) + vtcon1 (frame buffer, bound) + efi-framebuffer


def _hex(v: int, width: int = 4) -> str:
    return f"0x{v:0{width}x}\n"


def _rel(src_dir: Path, target: Path) -> str:
    return os.path.relpath(target, src_dir)


def _link(at: Path, target: Path) -> None:
    at.parent.mkdir(parents=True, exist_ok=True)
    if at.is_symlink():
        at.unlink()
    at.symlink_to(_rel(at.parent, target))


def _write(path: Path, text: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)


def split_addr(addr: str) -> tuple[int, int, int, int]:
    dom, bus, rest = addr.split(":")
    slot, fn = rest.split(".")
    return int(dom, 16), int(bus, 16), int(slot, 16), int(fn, 16)


class TreeBuilder:
    """Writes PCI functions (and what hangs off them) into a tree rooted at ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.dirs: dict[str, Path] = {}
        self.specs: dict[str, Pci] = {}
        for d in ("bus/pci/devices", "bus/pci/drivers", "bus/usb/devices", "kernel/iommu_groups",
                  "class/iommu", "class/block", "class/net", "dev/block", "module",
                  "bus/mdev/devices"):
            (root / d).mkdir(parents=True, exist_ok=True)
        _write(root / "bus/pci/drivers_probe", "")
        _write(root / "bus/pci/rescan", "")
        for drv in DRIVERS_ALWAYS:
            self.driver_dir(drv)

    def driver_dir(self, name: str) -> Path:
        d = self.root / "bus/pci/drivers" / name
        if not d.exists():
            for f in ("bind", "unbind", "new_id", "remove_id", "uevent"):
                _write(d / f, "")
        return d

    def device_dir(self, spec: Pci) -> Path:
        dom, bus, _, _ = split_addr(spec.addr)
        if spec.parent is None:
            base = self.root / f"devices/pci{dom:04x}:{bus:02x}"
        else:
            base = self.dirs[spec.parent]
        return base / spec.addr

    def add(self, spec: Pci) -> Path:
        d = self.device_dir(spec)
        self.dirs[spec.addr] = d
        self.specs[spec.addr] = spec
        d.mkdir(parents=True, exist_ok=True)
        sv, sd = spec.subsys
        _write(d / "vendor", _hex(spec.vendor))
        _write(d / "device", _hex(spec.device))
        _write(d / "subsystem_vendor", _hex(sv))
        _write(d / "subsystem_device", _hex(sd))
        _write(d / "class", _hex(spec.cls, 6))
        _write(d / "revision", _hex(spec.revision, 2))
        _write(d / "numa_node", f"{spec.numa_node}\n")
        _write(d / "driver_override", "(null)\n")
        _write(d / "enable", "1\n")
        _write(d / "remove", "")
        _write(d / "config", self._config(spec))
        if spec.cls >> 8 == 0x0300:  # the kernel has boot_vga on VGA-compatible devices only
            _write(d / "boot_vga", "1\n" if spec.boot_vga else "0\n")
        if spec.reset_method is not None:
            _write(d / "reset_method", spec.reset_method + "\n")
            _write(d / "reset", "")
        _link(d / "subsystem", self.root / "bus/pci")
        _link(self.root / "bus/pci/devices" / spec.addr, d)
        if spec.group is not None:
            g = self.root / "kernel/iommu_groups" / str(spec.group)
            _write(g / "type", "DMA-FQ\n")
            (g / "devices").mkdir(parents=True, exist_ok=True)
            _link(g / "devices" / spec.addr, d)
            _link(d / "iommu_group", g)
        if spec.driver:
            self.bind(spec.addr, spec.driver)
        self.write_uevent(spec.addr)
        if spec.sriov_totalvfs:
            for name, value in (("sriov_totalvfs", spec.sriov_totalvfs),
                                ("sriov_numvfs", 0), ("sriov_offset", spec.vf_offset),
                                ("sriov_stride", spec.vf_stride)):
                _write(d / name, f"{value}\n")
            _write(d / "sriov_vf_device", f"{spec.vf_device:04x}\n")
            _write(d / "sriov_drivers_autoprobe", "1\n")
            self.set_numvfs(spec.addr, spec.sriov_numvfs)
        for mt in spec.mdev_types:
            t = d / "mdev_supported_types" / mt.id
            _write(t / "name", mt.name + "\n")
            _write(t / "description", mt.description + "\n")
            _write(t / "available_instances", f"{mt.available}\n")
            _write(t / "device_api", mt.device_api + "\n")
            _write(t / "create", "")
            (t / "devices").mkdir(exist_ok=True)
            for uuid in mt.instances:
                self.add_mdev(spec.addr, mt.id, uuid)
        if spec.usb:
            self._usb(d, len(self.usb_buses()) + 1, spec.usb)
        for name, devno in spec.block:
            b = d / "host0/block" / name
            _write(b / "dev", devno + "\n")
            _write(b / "uevent", f"MAJOR={devno.split(':')[0]}\nMINOR={devno.split(':')[1]}\n"
                                 f"DEVNAME={name}\nDEVTYPE=disk\n")
            _link(self.root / "class/block" / name, b)
            _link(self.root / "dev/block" / devno, b)
            major, minor = devno.split(":")
            part = f"{name}{'p' if name[-1].isdigit() else ''}1"
            _write(b / part / "dev", f"{major}:{int(minor) + 1}\n")
            _write(b / part / "partition", "1\n")
            _link(self.root / "class/block" / part, b / part)
            _link(self.root / "dev/block" / f"{major}:{int(minor) + 1}", b / part)
        for name in spec.net:
            n = d / "net" / name
            _write(n / "address", "52:54:00:12:34:56\n")
            _link(self.root / "class/net" / name, n)
        return d

    @staticmethod
    def _config(spec: Pci) -> bytes:
        """The first 64 bytes of configuration space, enough for lspci to read."""
        header = 0x01 if spec.cls >> 8 == 0x0604 else 0x00
        cfg = bytearray(64)
        struct.pack_into("<HHHHI", cfg, 0, spec.vendor, spec.device, 0x0007, 0x0010,
                         (spec.cls << 8) | spec.revision)
        cfg[0x0E] = header
        if header == 0:
            struct.pack_into("<HH", cfg, 0x2C, spec.subsys[0], spec.subsys[1])
        return bytes(cfg)

    def usb_buses(self) -> list[Path]:
        return [p for p in (self.root / "bus/usb/devices").iterdir() if p.name.startswith("usb")]

    def _usb(self, ctrl: Path, busnum: int, devices: Iterable[Usb]) -> None:
        hub = ctrl / f"usb{busnum}"
        self._usb_attrs(hub, busnum, 1, Usb(port=f"usb{busnum}", vendor=0x1D6B, product=0x0002,
                                            manufacturer="Linux", name="xHCI Host Controller",
                                            device_class=0x09, interface_classes=(0x09,),
                                            driver="hub"))
        for n, dev in enumerate(devices, start=2):
            self._usb_attrs(hub / dev.port, busnum, n, dev)

    def _usb_attrs(self, d: Path, busnum: int, devnum: int, dev: Usb) -> None:
        _write(d / "idVendor", f"{dev.vendor:04x}\n")
        _write(d / "idProduct", f"{dev.product:04x}\n")
        _write(d / "bDeviceClass", f"{dev.device_class:02x}\n")
        _write(d / "busnum", f"{busnum}\n")
        _write(d / "devnum", f"{devnum}\n")
        if dev.manufacturer:
            _write(d / "manufacturer", dev.manufacturer + "\n")
        if dev.name:
            _write(d / "product", dev.name + "\n")
        _write(d / "uevent", f"DEVTYPE=usb_device\nPRODUCT={dev.vendor:x}/{dev.product:x}/0\n"
                             f"BUSNUM={busnum:03d}\nDEVNUM={devnum:03d}\n")
        _link(self.root / "bus/usb/devices" / d.name, d)
        port = f"{busnum}-0" if d.name.startswith("usb") else d.name
        for i, cls in enumerate(dev.interface_classes):
            name = f"{port}:1.{i}"
            intf = d / name
            _write(intf / "bInterfaceClass", f"{cls:02x}\n")
            _write(intf / "uevent", f"DEVTYPE=usb_interface\nDRIVER={dev.driver}\n")
            _link(self.root / "bus/usb/devices" / name, intf)

    # -- what the kernel does in reply to writes ------------------------------------------

    def write_uevent(self, addr: str) -> None:
        spec = self.specs[addr]
        d = self.dirs[addr]
        lines = []
        drv = d / "driver"
        if drv.is_symlink():
            lines.append(f"DRIVER={os.readlink(drv).rsplit('/', 1)[-1]}")
        sv, sd = spec.subsys
        lines += [f"PCI_CLASS={spec.cls:X}", f"PCI_ID={spec.vendor:04X}:{spec.device:04X}",
                  f"PCI_SUBSYS_ID={sv:04X}:{sd:04X}", f"PCI_SLOT_NAME={addr}",
                  f"MODALIAS=pci:v{spec.vendor:08X}d{spec.device:08X}sv{sv:08X}sd{sd:08X}"
                  f"bc{spec.cls >> 16:02X}sc{(spec.cls >> 8) & 0xFF:02X}i{spec.cls & 0xFF:02X}"]
        _write(d / "uevent", "\n".join(lines) + "\n")

    def bind(self, addr: str, driver: str) -> None:
        d = self.dirs[addr]
        dd = self.driver_dir(driver)
        _link(d / "driver", dd)
        _link(dd / addr, d)
        self.write_uevent(addr)

    def unbind(self, addr: str) -> None:
        d = self.dirs[addr]
        link = d / "driver"
        if link.is_symlink():
            dd = link.resolve()
            (dd / addr).unlink(missing_ok=True)
            link.unlink()
        self.write_uevent(addr)

    def set_numvfs(self, addr: str, n: int) -> None:
        pf = self.specs[addr]
        d = self.dirs[addr]
        for old in list(d.glob("virtfn*")):
            vf_addr = os.readlink(old).rsplit("/", 1)[-1]
            self.remove(vf_addr)
            old.unlink()
        dom, bus, slot, fn = split_addr(addr)
        for i in range(n):
            rid = (bus << 8 | slot << 3 | fn) + pf.vf_offset + i * pf.vf_stride
            vf_addr = f"{dom:04x}:{rid >> 8:02x}:{(rid >> 3) & 0x1F:02x}.{rid & 7}"
            group = None
            if pf.group is not None:
                groups = [int(p.name) for p in (self.root / "kernel/iommu_groups").iterdir()]
                group = max(groups) + 1
            self.add(Pci(addr=vf_addr, vendor=pf.vendor, device=pf.vf_device, cls=pf.cls,
                         subsys=pf.subsys, driver=pf.vf_driver, group=group, parent=pf.parent,
                         numa_node=pf.numa_node, reset_method="flr"))
            vf_dir = self.dirs[vf_addr]
            _link(d / f"virtfn{i}", vf_dir)
            _link(vf_dir / "physfn", d)
        _write(d / "sriov_numvfs", f"{n}\n")

    def remove(self, addr: str) -> None:
        """The device leaves: links go, its directory goes (a hot-unplug or a VF disabled)."""
        self.unbind(addr)
        d = self.dirs.pop(addr)
        self.specs.pop(addr)
        (self.root / "bus/pci/devices" / addr).unlink(missing_ok=True)
        grp = d / "iommu_group"
        if grp.is_symlink():
            g = grp.resolve()
            (g / "devices" / addr).unlink(missing_ok=True)
            if not any((g / "devices").iterdir()):
                for p in sorted(g.rglob("*"), reverse=True):
                    p.rmdir() if p.is_dir() and not p.is_symlink() else p.unlink()
                g.rmdir()
        for p in sorted(d.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            p.rmdir() if p.is_dir() and not p.is_symlink() else p.unlink()
        d.rmdir()

    def add_mdev(self, addr: str, type_id: str, uuid: str) -> None:
        parent = self.dirs[addr]
        t = parent / "mdev_supported_types" / type_id
        m = parent / uuid
        _write(m / "remove", "")
        _write(m / "uevent", f"MDEV_TYPE={type_id}\n")
        _link(m / "mdev_type", t)
        _link(t / "devices" / uuid, m)
        _link(self.root / "bus/mdev/devices" / uuid, m)

    def remove_mdev(self, uuid: str) -> None:
        link = self.root / "bus/mdev/devices" / uuid
        m = link.resolve()
        t = (m / "mdev_type").resolve()
        (t / "devices" / uuid).unlink()
        link.unlink()
        (m / "mdev_type").unlink()
        for f in ("remove", "uevent"):
            (m / f).unlink()
        m.rmdir()


def build(root: str | Path, host: Host) -> TreeBuilder:
    """Lay ``host`` out under ``root``; the builder's ``.root`` is the tree's root."""
    b = TreeBuilder(Path(root))
    root = b.root
    for spec in host.devices:
        b.add(spec)
    for name in host.iommu:
        v = root / "devices/virtual/iommu" / name
        _write(v / "uevent", "")
        _link(root / "class/iommu" / name, v)
    feats = ",".join(f"{FEATURES[f]:04X}" for f in sorted(host.cpu_flags, key=FEATURES.__getitem__))
    code = VENDOR_CODES.get(host.cpu_vendor, 99)
    _write(root / "devices/system/cpu/modalias",
           f"cpu:type:x86,ven{code:04X}fam0006mod009E:feature:,{feats}\n")
    if "hypervisor" not in host.cpu_flags or host.kvm_modules:
        v = root / "devices/virtual/misc/kvm"
        _write(v / "uevent", "MAJOR=10\nMINOR=232\nDEVNAME=kvm\n")
        _link(root / "class/misc/kvm", v)
    if host.consoles:
        for n, (name, bound) in enumerate((("(S) dummy device", "0"),
                                           ("(M) frame buffer device", "1"))):
            v = root / f"devices/virtual/vtconsole/vtcon{n}"
            _write(v / "name", name + "\n")
            _write(v / "bind", bound + "\n")
            _link(root / f"class/vtconsole/vtcon{n}", v)
        fb = root / "devices/platform/efi-framebuffer.0"
        fb.mkdir(parents=True, exist_ok=True)
        drv = root / "bus/platform/drivers/efi-framebuffer"
        for f in ("bind", "unbind"):
            _write(drv / f, "")
        _link(drv / "efi-framebuffer.0", fb)
    for mod, params in host.kvm_modules.items():
        for k, val in params.items():
            _write(root / "module" / mod / "parameters" / k, val + "\n")
    return b


class TreeKernel:
    """Plays the kernel's part after the adapter writes into a tree (``Sysfs(after_write=…)``).

    ``fail`` maps a path suffix (e.g. ``"bus/pci/drivers_probe"``) to the number of the
    write to it that should fail with EIO (1 = the first), so rollback can be tested.
    """

    def __init__(self, builder: TreeBuilder, fail: dict[str, int] | None = None) -> None:
        self.b = builder
        self.fail = dict(fail or {})
        self.seen: dict[str, int] = {}
        self.writes: list[tuple[str, str]] = []

    def __call__(self, path: str, value: str) -> None:
        rel = os.path.relpath(path, self.b.root)
        self.writes.append((rel, value))
        for suffix, nth in self.fail.items():
            if rel.endswith(suffix):
                self.seen[suffix] = self.seen.get(suffix, 0) + 1
                if self.seen[suffix] == nth:
                    raise OSError(5, "Input/output error", path)
        self._react(rel, value.strip())

    def _react(self, rel: str, value: str) -> None:
        p = rel.split("/")
        if p[:3] == ["bus", "pci", "drivers"] and p[-1] in ("bind", "unbind"):
            if p[-1] == "unbind":
                self.b.unbind(value)
            else:
                self._probe(value, p[3])
        elif rel == "bus/pci/drivers_probe":
            self._probe(value, None)
        elif p[:3] == ["bus", "pci", "devices"] and len(p) > 4:
            addr = p[3]
            if p[4] == "sriov_numvfs":
                current = len(list(self.b.dirs[addr].glob("virtfn*")))
                if current and int(value) and current != int(value):
                    raise OSError(16, "Device or resource busy", rel)
                self.b.set_numvfs(addr, int(value))
            elif p[4] == "uevent":
                self.b.write_uevent(addr)
            elif p[4] == "driver_override" and not value:
                (self.b.dirs[addr] / "driver_override").write_text("(null)\n")
            elif p[4] == "mdev_supported_types" and p[-1] == "create":
                self._available(self.b.dirs[addr] / "mdev_supported_types" / p[5], -1)
                self.b.add_mdev(addr, p[5], value)
        elif p[:3] == ["bus", "mdev", "devices"] and p[-1] == "remove":
            self._available((self.b.root / "bus/mdev/devices" / p[3] / "mdev_type").resolve(), 1)
            self.b.remove_mdev(p[3])
        elif p[:3] == ["bus", "platform", "drivers"] and p[-1] in ("bind", "unbind"):
            link = self.b.root / "bus/platform/drivers" / p[3] / value
            if p[-1] == "unbind":
                link.unlink()
            else:
                _link(link, self.b.root / "devices/platform" / value)

    @staticmethod
    def _available(type_dir: Path, delta: int) -> None:
        f = type_dir / "available_instances"
        n = int(f.read_text()) + delta
        if n < 0:
            raise OSError(28, "No space left on device", str(f))
        f.write_text(f"{n}\n")

    def _probe(self, addr: str, driver: str | None) -> None:
        d = self.b.dirs[addr]
        if (d / "driver").is_symlink():
            return
        override = (d / "driver_override").read_text().strip()
        if override and override != "(null)":
            if driver not in (None, override):
                raise OSError(19, "No such device", driver)
            driver = override
        driver = driver or self.b.specs[addr].driver
        if driver:
            if not (self.b.root / "bus/pci/drivers" / driver).is_dir():
                raise OSError(19, "No such device", driver)
            self.b.bind(addr, driver)


# -- the fixture hosts ------------------------------------------------------------------------

BT = Usb(port="1-14", vendor=0x8087, product=0x0AAA, manufacturer="Intel Corp.",
         name="Bluetooth 9460/9560 Jefferson Peak (JfP)", device_class=0xE0,
         interface_classes=(0xE0, 0xE0), driver="btusb")
KEYBOARD = Usb(port="1-3", vendor=0x046D, product=0xC31C, manufacturer="Logitech",
               name="Keyboard K120")
INTEL_CPU = ("vmx",)
AMD_CPU = ("svm",)


def intel_desktop() -> Host:
    """Z390 + i7-9700K: RTX 2070 (VGA, HDMI audio, USB, UCSI) behind root port 00:01.0."""
    return Host(
        name="intel-desktop", cpu_vendor="intel", cpu_flags=INTEL_CPU + ("sgx",),
        iommu=("dmar0", "dmar1"), root_dev="8:1",
        kvm_modules={"kvm_intel": {"nested": "Y"}},
        devices=[
            Pci(addr="0000:00:00.0", vendor=0x8086, device=0x3E30, cls=0x060000,
                driver="skl_uncore", group=0, subsys=(0x1462, 0x7B17)),
            Pci(addr="0000:00:01.0", vendor=0x8086, device=0x1901, cls=0x060400,
                driver="pcieport", group=1),
            Pci(addr="0000:01:00.0", vendor=0x10DE, device=0x1F02, cls=0x030000,
                driver="nvidia", group=1, parent="0000:00:01.0", subsys=(0x1043, 0x8670)),
            Pci(addr="0000:01:00.1", vendor=0x10DE, device=0x10F9, cls=0x040300,
                driver="snd_hda_intel", group=1, parent="0000:00:01.0",
                subsys=(0x1043, 0x8670)),
            Pci(addr="0000:01:00.2", vendor=0x10DE, device=0x1ADA, cls=0x0C0330,
                driver="xhci_hcd", group=1, parent="0000:00:01.0", subsys=(0x1043, 0x8670)),
            Pci(addr="0000:01:00.3", vendor=0x10DE, device=0x1ADB, cls=0x0C8000,
                driver="nvidia-gpu", group=1, parent="0000:00:01.0", subsys=(0x1043, 0x8670)),
            Pci(addr="0000:00:02.0", vendor=0x8086, device=0x3E98, cls=0x030000,
                driver="i915", group=2, boot_vga=True, subsys=(0x1462, 0x7B17)),
            Pci(addr="0000:00:14.0", vendor=0x8086, device=0xA36D, cls=0x0C0330,
                driver="xhci_hcd", group=3, usb=(KEYBOARD, BT), subsys=(0x1462, 0x7B17)),
            Pci(addr="0000:00:14.2", vendor=0x8086, device=0xA36F, cls=0x050000,
                group=3, subsys=(0x1462, 0x7B17)),
            Pci(addr="0000:00:17.0", vendor=0x8086, device=0xA352, cls=0x010601,
                driver="ahci", group=4, block=(("sda", "8:0"),), subsys=(0x1462, 0x7B17)),
            Pci(addr="0000:00:1f.0", vendor=0x8086, device=0xA305, cls=0x060100, group=5,
                subsys=(0x1462, 0x7B17)),
            Pci(addr="0000:00:1f.3", vendor=0x8086, device=0xA348, cls=0x040300,
                driver="snd_hda_intel", group=5, subsys=(0x1462, 0xFB17)),
            Pci(addr="0000:00:1f.4", vendor=0x8086, device=0xA323, cls=0x0C0500,
                driver="i801_smbus", group=5, subsys=(0x1462, 0x7B17)),
            Pci(addr="0000:00:1f.5", vendor=0x8086, device=0xA324, cls=0x0C8000,
                driver="intel-spi", group=5, subsys=(0x1462, 0x7B17)),
            Pci(addr="0000:00:1f.6", vendor=0x8086, device=0x15BC, cls=0x020000,
                driver="e1000e", group=5, net=("eno1",), subsys=(0x1462, 0x7B17)),
        ])


def amd_desktop() -> Host:
    """B450 + Ryzen 7 2700X: the chipset group holds USB, SATA, bridges and the only NIC."""
    return Host(
        name="amd-desktop", cpu_vendor="amd", cpu_flags=AMD_CPU + ("sev",),
        iommu=("ivhd0",), root_dev="259:1",
        kvm_modules={"kvm_amd": {"nested": "1", "sev": "N"}},
        devices=[
            Pci(addr="0000:00:00.0", vendor=0x1022, device=0x1450, cls=0x060000, group=0),
            Pci(addr="0000:00:01.1", vendor=0x1022, device=0x1453, cls=0x060400,
                driver="pcieport", group=2),
            Pci(addr="0000:01:00.0", vendor=0x144D, device=0xA808, cls=0x010802,
                driver="nvme", group=3, parent="0000:00:01.1",
                block=(("nvme0n1", "259:0"),), subsys=(0x144D, 0xA801)),
            Pci(addr="0000:00:01.3", vendor=0x1022, device=0x1453, cls=0x060400,
                driver="pcieport", group=4),
            Pci(addr="0000:02:00.0", vendor=0x1022, device=0x43D5, cls=0x0C0330,
                driver="xhci_hcd", group=4, parent="0000:00:01.3", usb=(KEYBOARD,),
                subsys=(0x1B21, 0x1142)),
            Pci(addr="0000:02:00.1", vendor=0x1022, device=0x43C8, cls=0x010601,
                driver="ahci", group=4, parent="0000:00:01.3", block=(("sda", "8:0"),),
                subsys=(0x1B21, 0x1062)),
            Pci(addr="0000:02:00.2", vendor=0x1022, device=0x43C6, cls=0x060400,
                driver="pcieport", group=4, parent="0000:00:01.3"),
            Pci(addr="0000:03:00.0", vendor=0x1022, device=0x43C7, cls=0x060400,
                driver="pcieport", group=4, parent="0000:02:00.2"),
            Pci(addr="0000:03:04.0", vendor=0x1022, device=0x43C7, cls=0x060400,
                driver="pcieport", group=4, parent="0000:02:00.2"),
            Pci(addr="0000:05:00.0", vendor=0x10EC, device=0x8168, cls=0x020000,
                driver="r8169", group=4, parent="0000:03:04.0", net=("enp5s0",),
                subsys=(0x1043, 0x8677), revision=0x15),
            Pci(addr="0000:00:03.1", vendor=0x1022, device=0x1453, cls=0x060400,
                driver="pcieport", group=5),
            Pci(addr="0000:08:00.0", vendor=0x1002, device=0x73BF, cls=0x030000,
                driver="amdgpu", group=6, parent="0000:00:03.1", boot_vga=True,
                subsys=(0x1002, 0x0E3A), revision=0xC1),
            Pci(addr="0000:08:00.1", vendor=0x1002, device=0xAB28, cls=0x040300,
                driver="snd_hda_intel", group=6, parent="0000:00:03.1",
                subsys=(0x1002, 0xAB28)),
            Pci(addr="0000:08:00.2", vendor=0x1002, device=0x73A6, cls=0x0C0330,
                driver="xhci_hcd", group=6, parent="0000:00:03.1", subsys=(0x1002, 0x0E3A)),
            Pci(addr="0000:08:00.3", vendor=0x1002, device=0x73A4, cls=0x0C8000,
                group=6, parent="0000:00:03.1", subsys=(0x1002, 0x0E3A)),
            Pci(addr="0000:00:14.0", vendor=0x1022, device=0x790B, cls=0x0C0500,
                driver="piix4_smbus", group=7, revision=0x59),
            Pci(addr="0000:00:14.3", vendor=0x1022, device=0x790E, cls=0x060100, group=7,
                revision=0x51),
            Pci(addr="0000:00:18.0", vendor=0x1022, device=0x1460, cls=0x060000, group=8),
            Pci(addr="0000:00:18.3", vendor=0x1022, device=0x1463, cls=0x060000,
                driver="k10temp", group=8),
        ])


def laptop() -> Host:
    """Comet Lake-H laptop: UHD iGPU (boot VGA) + GTX 1650 Mobile (3D controller)."""
    return Host(
        name="laptop", cpu_vendor="intel", cpu_flags=INTEL_CPU,
        iommu=("dmar0", "dmar1"), root_dev="259:1",
        kvm_modules={"kvm_intel": {"nested": "N"}},
        devices=[
            Pci(addr="0000:00:00.0", vendor=0x8086, device=0x9B54, cls=0x060000, group=0),
            Pci(addr="0000:00:02.0", vendor=0x8086, device=0x9BC4, cls=0x030000,
                driver="i915", group=1, boot_vga=True, subsys=(0x1028, 0x097D)),
            Pci(addr="0000:00:01.0", vendor=0x8086, device=0x1901, cls=0x060400,
                driver="pcieport", group=2),
            Pci(addr="0000:01:00.0", vendor=0x10DE, device=0x1F91, cls=0x030200,
                driver="nouveau", group=2, parent="0000:00:01.0", subsys=(0x1028, 0x097D)),
            Pci(addr="0000:00:14.0", vendor=0x8086, device=0x06ED, cls=0x0C0330,
                driver="xhci_hcd", group=3, usb=(BT,), subsys=(0x1028, 0x097D)),
            Pci(addr="0000:00:14.2", vendor=0x8086, device=0x06EF, cls=0x050000, group=3),
            Pci(addr="0000:00:14.3", vendor=0x8086, device=0x06F0, cls=0x028000,
                driver="iwlwifi", group=3, net=("wlp0s20f3",), subsys=(0x8086, 0x0074)),
            Pci(addr="0000:00:1d.0", vendor=0x8086, device=0x06B0, cls=0x060400,
                driver="pcieport", group=4),
            Pci(addr="0000:02:00.0", vendor=0x15B7, device=0x5006, cls=0x010802,
                driver="nvme", group=5, parent="0000:00:1d.0",
                block=(("nvme0n1", "259:0"),), subsys=(0x15B7, 0x5006)),
            Pci(addr="0000:00:1f.0", vendor=0x8086, device=0x068E, cls=0x060100, group=6),
            Pci(addr="0000:00:1f.3", vendor=0x8086, device=0x06C8, cls=0x040380,
                driver="sof-audio-pci-intel-cnl", group=6, subsys=(0x1028, 0x097D)),
            Pci(addr="0000:00:1f.4", vendor=0x8086, device=0x06A3, cls=0x0C0500,
                driver="i801_smbus", group=6),
            Pci(addr="0000:00:1f.5", vendor=0x8086, device=0x06A4, cls=0x0C8000,
                driver="intel-spi", group=6),
        ])


def single_gpu() -> Host:
    """Ryzen 5 5600X (no iGPU) with one RTX 3070: passing it takes the host's display."""
    return Host(
        name="single-gpu", cpu_vendor="amd", cpu_flags=AMD_CPU, iommu=("ivhd0",),
        root_dev="259:1", consoles=True, kvm_modules={"kvm_amd": {"nested": "1"}},
        devices=[
            Pci(addr="0000:00:00.0", vendor=0x1022, device=0x1480, cls=0x060000, group=0),
            Pci(addr="0000:00:03.1", vendor=0x1022, device=0x1483, cls=0x060400,
                driver="pcieport", group=1),
            Pci(addr="0000:0a:00.0", vendor=0x10DE, device=0x2484, cls=0x030000,
                driver="nvidia", group=2, parent="0000:00:03.1", boot_vga=True,
                subsys=(0x1458, 0x404C)),
            Pci(addr="0000:0a:00.1", vendor=0x10DE, device=0x228B, cls=0x040300,
                driver="snd_hda_intel", group=2, parent="0000:00:03.1",
                subsys=(0x1458, 0x404C)),
            Pci(addr="0000:00:01.2", vendor=0x1022, device=0x1483, cls=0x060400,
                driver="pcieport", group=3),
            Pci(addr="0000:01:00.0", vendor=0x144D, device=0xA80A, cls=0x010802,
                driver="nvme", group=4, parent="0000:00:01.2",
                block=(("nvme0n1", "259:0"),), subsys=(0x144D, 0xA801)),
            Pci(addr="0000:00:01.3", vendor=0x1022, device=0x1483, cls=0x060400,
                driver="pcieport", group=5),
            Pci(addr="0000:03:00.0", vendor=0x8086, device=0x15F3, cls=0x020000,
                driver="igc", group=6, parent="0000:00:01.3", net=("enp3s0",)),
        ])


def sriov_nic() -> Host:
    """Xeon server: a dual-port 82599 with SR-IOV (2 VFs enabled on port 0) and a mgmt NIC."""
    return Host(
        name="sriov-nic", cpu_vendor="intel", cpu_flags=INTEL_CPU, iommu=("dmar0",),
        root_dev="8:1", kvm_modules={"kvm_intel": {"nested": "Y"}},
        devices=[
            Pci(addr="0000:00:00.0", vendor=0x8086, device=0x2020, cls=0x060000, group=0),
            Pci(addr="0000:00:02.0", vendor=0x8086, device=0x2032, cls=0x060400,
                driver="pcieport", group=1),
            Pci(addr="0000:03:00.0", vendor=0x8086, device=0x10FB, cls=0x020000,
                driver="ixgbe", group=2, parent="0000:00:02.0", sriov_totalvfs=63,
                sriov_numvfs=2, vf_device=0x10ED, vf_driver="ixgbevf", numa_node=0,
                subsys=(0x8086, 0x000C), net=("ens2f0",)),
            Pci(addr="0000:03:00.1", vendor=0x8086, device=0x10FB, cls=0x020000,
                driver="ixgbe", group=2, parent="0000:00:02.0", sriov_totalvfs=63,
                vf_device=0x10ED, vf_driver="ixgbevf", numa_node=0,
                subsys=(0x8086, 0x000C), net=("ens2f1",)),
            Pci(addr="0000:00:1c.0", vendor=0x8086, device=0xA190, cls=0x060400,
                driver="pcieport", group=10),
            Pci(addr="0000:05:00.0", vendor=0x8086, device=0x1533, cls=0x020000,
                driver="igb", group=11, parent="0000:00:1c.0", net=("eno1",)),
            Pci(addr="0000:00:17.0", vendor=0x8086, device=0xA182, cls=0x010601,
                driver="ahci", group=12, block=(("sda", "8:0"),)),
        ])


GVTG_DESC = "low_gm_size: {lo}MB\nhigh_gm_size: {hi}MB\nfence: 4\nresolution: {res}\nweight: {w}"


def intel_gvtg() -> Host:
    """Kaby Lake desktop whose HD 630 offers GVT-g mdev types (one instance already made)."""
    return Host(
        name="intel-gvtg", cpu_vendor="intel", cpu_flags=INTEL_CPU, iommu=("dmar0", "dmar1"),
        root_dev="8:1", kvm_modules={"kvm_intel": {"nested": "Y"}},
        devices=[
            Pci(addr="0000:00:00.0", vendor=0x8086, device=0x591F, cls=0x060000, group=0),
            Pci(addr="0000:00:02.0", vendor=0x8086, device=0x5912, cls=0x030000,
                driver="i915", group=1, boot_vga=True, subsys=(0x1458, 0xD000),
                mdev_types=(
                    MdevType(id="i915-GVTg_V5_4", name="GVTg_V5_4", available=1,
                             description=GVTG_DESC.format(lo=128, hi=512, res="1920x1200", w=4),
                             instances=("9f5c1a2e-5f7b-4c1e-8a5b-3a4f1e2d3c4b",)),
                    MdevType(id="i915-GVTg_V5_8", name="GVTg_V5_8", available=2,
                             description=GVTG_DESC.format(lo=64, hi=384, res="1024x768", w=2)),
                )),
            Pci(addr="0000:00:17.0", vendor=0x8086, device=0xA282, cls=0x010601,
                driver="ahci", group=3, block=(("sda", "8:0"),)),
            Pci(addr="0000:00:1f.6", vendor=0x8086, device=0x15B8, cls=0x020000,
                driver="e1000e", group=4, net=("eno1",)),
        ])


def iommu_off() -> Host:
    """An Intel desktop booted without ``intel_iommu=on``: no groups, no class/iommu."""
    devices = [Pci(**{**d.__dict__, "group": None}) for d in intel_desktop().devices]
    return Host(name="iommu-off", cpu_vendor="intel", cpu_flags=INTEL_CPU, devices=devices,
                root_dev="8:1", kvm_modules={"kvm_intel": {"nested": "Y"}})


def iommu_ungrouped() -> Host:
    """The Intel desktop with the IOMMU on, but the firmware lists no DMAR unit for the iGPU
    (``dmar0`` absent, "VT-d for the IGD" off in its setup): 00:02.0 has no IOMMU group while
    every other device keeps its own."""
    desktop = intel_desktop()
    devices = [replace(d, group=None) if d.addr == "0000:00:02.0" else d
               for d in desktop.devices]
    return replace(desktop, name="iommu-ungrouped", iommu=("dmar1",), devices=devices)


def epyc_snp() -> Host:
    """EPYC 9654 (Genoa) server with SEV, SEV-ES and SEV-SNP enabled in kvm_amd."""
    return Host(
        name="epyc-snp", cpu_vendor="amd", cpu_flags=AMD_CPU + ("sev", "sev_es", "sev_snp"),
        iommu=("ivhd0",), root_dev="259:1",
        kvm_modules={"kvm_amd": {"nested": "1", "sev": "Y", "sev_es": "Y", "sev_snp": "Y"}},
        devices=[
            Pci(addr="0000:00:00.0", vendor=0x1022, device=0x14A4, cls=0x060000, group=0),
            Pci(addr="0000:00:01.1", vendor=0x1022, device=0x14AB, cls=0x060400,
                driver="pcieport", group=1),
            Pci(addr="0000:01:00.0", vendor=0x144D, device=0xA824, cls=0x010802,
                driver="nvme", group=2, parent="0000:00:01.1",
                block=(("nvme0n1", "259:0"),), subsys=(0x144D, 0xA801)),
            Pci(addr="0000:00:03.1", vendor=0x1022, device=0x14AB, cls=0x060400,
                driver="pcieport", group=3),
            Pci(addr="0000:41:00.0", vendor=0x15B3, device=0x101D, cls=0x020000,
                driver="mlx5_core", group=4, parent="0000:00:03.1", net=("ens1f0np0",)),
        ])


def sapphire_rapids_tdx() -> Host:
    """Xeon Platinum 8480+ (Sapphire Rapids) server with TDX on in kvm_intel."""
    return Host(
        name="sapphire-rapids-tdx", cpu_vendor="intel", cpu_flags=INTEL_CPU,
        iommu=("dmar0",), root_dev="259:1",
        kvm_modules={"kvm_intel": {"nested": "Y", "tdx": "Y"}},
        devices=[
            Pci(addr="0000:00:00.0", vendor=0x8086, device=0x09A2, cls=0x080000, group=0),
            Pci(addr="0000:00:01.0", vendor=0x8086, device=0x352A, cls=0x060400,
                driver="pcieport", group=1),
            Pci(addr="0000:01:00.0", vendor=0x8086, device=0x0B60, cls=0x010802,
                driver="nvme", group=2, parent="0000:00:01.0",
                block=(("nvme0n1", "259:0"),), subsys=(0x8086, 0x8008)),
            Pci(addr="0000:00:1f.6", vendor=0x8086, device=0x1593, cls=0x020000,
                driver="ice", group=3, net=("eno1",)),
        ])


FIXTURES: dict[str, Callable[[], Host]] = {
    "intel-desktop": intel_desktop, "amd-desktop": amd_desktop, "laptop": laptop,
    "single-gpu": single_gpu, "sriov-nic": sriov_nic, "intel-gvtg": intel_gvtg,
    "iommu-off": iommu_off, "iommu-ungrouped": iommu_ungrouped,
    "epyc-snp": epyc_snp, "sapphire-rapids-tdx": sapphire_rapids_tdx,
}


# -- recording a real machine -------------------------------------------------------------------

ATTRS = ("vendor", "device", "subsystem_vendor", "subsystem_device", "class", "revision",
         "boot_vga", "numa_node", "reset_method", "driver_override", "uevent", "enable",
         "sriov_totalvfs", "sriov_numvfs", "sriov_offset", "sriov_stride", "sriov_vf_device")
USB_ATTRS = ("idVendor", "idProduct", "bDeviceClass", "busnum", "devnum", "manufacturer",
             "product", "uevent", "bInterfaceClass")


def record(src: str | Path, dst: str | Path) -> Path:
    """Copy what the hardware agent reads from ``src`` (a real /sys) into a tree at ``dst``.

    Attribute files, the driver / IOMMU group / SR-IOV links, mdev types, USB devices under
    their controllers, disks and network interfaces, the cpu modalias and the kvm modules'
    parameters; symlinks keep their relative targets, as in sysfs.
    """
    src, dst = Path(src), Path(dst)

    def copy_file(rel: Path, limit: int = 1 << 16) -> None:
        try:
            data = (src / rel).read_bytes()[:limit]
        except OSError:
            return
        _write(dst / rel, data)

    def copy_link(rel: Path) -> Path:
        """Mirror a symlink; returns its target relative to the root."""
        target = os.readlink(src / rel)
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        if not (dst / rel).is_symlink():
            (dst / rel).symlink_to(target)
        resolved = (src / rel).resolve().relative_to(src.resolve())
        (dst / resolved).mkdir(parents=True, exist_ok=True)
        return resolved

    def copy_dir(rel: Path, names: Iterable[str], depth: int) -> None:
        for p in sorted((src / rel).iterdir()) if (src / rel).is_dir() else []:
            if p.is_symlink():
                continue
            if p.is_file() and p.name in names:
                copy_file(rel / p.name)
            elif p.is_dir() and depth > 0:
                copy_dir(rel / p.name, names, depth - 1)

    devices = Path("bus/pci/devices")
    for link in sorted((src / devices).iterdir()):
        d = copy_link(devices / link.name)
        for name in ATTRS:
            copy_file(d / name)
        copy_file(d / "config", 64)
        for name in ("subsystem", "iommu_group", "physfn", "driver"):
            if (src / d / name).is_symlink():
                target = copy_link(d / name)
                if name == "driver":
                    for f in ("bind", "unbind", "new_id", "remove_id"):
                        _write(dst / target / f, "")
                    copy_link(target / link.name)
                elif name == "iommu_group":
                    copy_link(target / "devices" / link.name)
        for p in (src / d).glob("virtfn*"):
            copy_link(d / p.name)
        copy_dir(d / "mdev_supported_types", ("name", "description", "available_instances",
                                              "device_api"), 1)
        for hub in (src / d).glob("usb[0-9]*"):
            copy_dir(d / hub.name, USB_ATTRS, 6)
    for cls in ("block", "net", "iommu"):
        for p in sorted((src / "class" / cls).glob("*")):
            if cls == "iommu" or "/pci" in str(p.resolve()):
                t = copy_link(Path("class") / cls / p.name)
                for name in ("dev", "partition", "uevent"):
                    copy_file(t / name)
    for p in sorted((src / "dev/block").glob("*")):
        if (dst / p.resolve().relative_to(src.resolve())).is_dir():
            copy_link(Path("dev/block") / p.name)
    copy_file(Path("devices/system/cpu/modalias"))
    if (src / "class/misc/kvm").is_symlink():
        copy_file(copy_link(Path("class/misc/kvm")) / "uevent")
    for mod in sorted((src / "module").glob("kvm*")):
        (dst / "module" / mod.name / "parameters").mkdir(parents=True, exist_ok=True)
        copy_dir(Path("module") / mod.name / "parameters",
                 ("nested", "sev", "sev_es", "sev_snp", "tdx"), 0)
    for empty in ("kernel/iommu_groups", "bus/pci/drivers", "class/iommu"):
        (dst / empty).mkdir(parents=True, exist_ok=True)
    _write(dst / "bus/pci/drivers_probe", "")
    return dst


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 3:
        sys.exit("usage: python -m tests.support.sysfs_tree SRC DST   (e.g. /sys /tmp/mytree)")
    print(record(sys.argv[1], sys.argv[2]))
