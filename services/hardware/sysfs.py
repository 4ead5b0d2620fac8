"""The hardware agent's one door to the machine: sysfs under a root, /proc, udev.

Every read and write goes under ``root`` (``PHYLLOME_SYSFS_ROOT``, default ``/sys``), so the
same code runs on a tree built by ``tests/support/sysfs_tree.py``; pyudev lists devices
and watches uevents only where the root is the real ``/sys``. Writes that change devices
go through ``write_bounded`` (a thread with a deadline), because a driver may block in them
for good (nvidia's unbind does) and the agent must keep serving and beating meanwhile::

    fs = Sysfs("/sys")
    dev = fs.read_device("0000:00:02.0")     # a PciDevice with ids, driver, group …
    await fs.write_bounded("bus/pci/drivers_probe", "0000:00:02.0")
"""

from __future__ import annotations

import logging
import os
import platform
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from shared.errors import BackendError, Conflict, NotFound, Timeout
from shared.messages.hardware import MdevType, PciDevice, StuckWrite, UsbDevice

if TYPE_CHECKING:  # asyncio is imported where a write needs it: a scan (the CLI's) does not
    import asyncio

_ADDR_IN_PATH = re.compile(r"[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]")
VFIO = "vfio-pci"
AfterWrite = Callable[[str, str], None]
log = logging.getLogger("phyllome.hardware.sysfs")


class CpuInfo(msgspec.Struct, frozen=True, kw_only=True):
    arch: str
    vendor: str  # intel | amd | other
    model: str
    flags: frozenset[str]


# The cpu modalias (devices/system/cpu/modalias) names the vendor by the kernel's x86 vendor
# number and lists feature numbers (word * 32 + bit, from cpufeatures.h; stable for years).
_VENDORS = {0: "intel", 2: "amd", 9: "amd"}  # 9 = Hygon, an AMD design with SVM
_FEATURES = {4 * 32 + 5: "vmx", 4 * 32 + 31: "hypervisor", 6 * 32 + 2: "svm",
             9 * 32 + 2: "sgx", 19 * 32 + 1: "sev", 19 * 32 + 3: "sev_es", 19 * 32 + 4: "sev_snp"}


class Sysfs:
    """sysfs (and, on the real machine, /proc and /dev/kvm) for the hardware agent.

    ``after_write`` is called with (path, value) after each write: on a tree, tests use it
    to play the kernel's part (a driver link appearing after ``drivers_probe``).
    ``root_dev`` is the ``major:minor`` of the root filesystem (read from ``/`` when real).
    ``stuck`` holds, by device, the writes that did not return within ``write_timeout_s``.
    """

    def __init__(self, root: str = "/sys", *, proc_root: str | None = None,
                 root_dev: str | None = None, after_write: AfterWrite | None = None,
                 write_timeout_s: float = 30.0) -> None:
        self.root = os.path.abspath(root)
        self.real = os.path.realpath(self.root) == "/sys"
        self.proc = proc_root if proc_root is not None else ("/proc" if self.real else "")
        if root_dev is None and self.real:
            st = os.stat("/")
            root_dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
        self.root_dev = root_dev
        self.after_write = after_write
        self.write_timeout_s = write_timeout_s
        self.stuck: dict[str, StuckWrite] = {}
        self._pci = f"{self.root}/bus/pci/devices"

    # -- primitives ---------------------------------------------------------------------------

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def attr(self, rel: str) -> str | None:
        """The stripped text of a file under the root, or None when it does not exist."""
        try:
            with open(f"{self.root}/{rel}", "rb") as f:
                return f.read().decode(errors="replace").strip()
        except FileNotFoundError:
            return None

    def link_name(self, rel: str) -> str | None:
        """The last component of a symlink's target (a driver, a group number), or None."""
        try:
            return os.readlink(f"{self.root}/{rel}").rsplit("/", 1)[-1]
        except OSError:
            return None

    def listdir(self, rel: str) -> list[str]:
        try:
            return os.listdir(f"{self.root}/{rel}")
        except (FileNotFoundError, NotADirectoryError):
            return []

    def exists(self, rel: str) -> bool:
        return os.path.lexists(f"{self.root}/{rel}")

    def write(self, rel: str, value: str) -> None:
        """Write ``value`` into a sysfs file; the kernel's refusal becomes BackendError."""
        path = f"{self.root}/{rel}"
        try:
            with open(path, "w") as f:
                f.write(value)
            if self.after_write is not None:
                self.after_write(path, value)
        except OSError as e:
            raise BackendError(f"writing {value.strip()!r} to {path} failed: "
                               f"{e.strerror or e}") from None

    async def write_bounded(self, rel: str, value: str) -> None:
        """``write`` in a thread of its own, awaited for at most ``write_timeout_s``.

        A thread blocked in a kernel write cannot be killed: past the deadline it is kept in
        ``stuck`` under its device, every later write for that device is refused until it
        returns, and the caller gets Timeout (its rollback goes on with the other devices).
        A daemon thread, not the loop's executor: a stuck one must not hold up the exit.
        When the caller is cancelled, the write is awaited before the cancel goes on, so a
        rollback never races the write it undoes.
        """
        import asyncio

        device = _device_of(rel, value)
        self.refuse_if_stuck(device)
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def settle(error: BaseException | None) -> None:
            if done.done():
                return
            if error is None:
                done.set_result(None)
            else:
                done.set_exception(error)

        def run() -> None:
            error: BaseException | None = None
            try:
                self.write(rel, value)
            except BaseException as e:  # handed to the awaiting side, never lost in a thread
                error = e
            try:
                loop.call_soon_threadsafe(settle, error)
            except RuntimeError:  # the loop has closed: nobody waits for this write any more
                pass

        started = time.time()
        threading.Thread(target=run, name=f"sysfs write {rel}", daemon=True).start()
        try:
            await asyncio.wait_for(asyncio.shield(done), self.write_timeout_s)
        except TimeoutError:
            self._stuck(device, StuckWrite(path=self.path(rel), value=value.strip(),
                                           since=started), done)
            raise Timeout(
                f"writing {value.strip()!r} to {self.path(rel)} did not return within "
                f"{self.write_timeout_s:g} s: the driver of {device} is blocked in the kernel. "
                "The write cannot be interrupted, and no other write to that device is made "
                "until it returns. Look at `dmesg` for the driver's complaint and stop what "
                "holds the device (a display server, nvidia-persistenced), or reboot the "
                "host; if the driver is only slow, raise [hardware] sysfs_write_timeout_s"
            ) from None
        except asyncio.CancelledError:
            await asyncio.wait([done], timeout=self.write_timeout_s)
            if not done.done():
                self._stuck(device, StuckWrite(path=self.path(rel), value=value.strip(),
                                               since=started), done)
            raise

    def refuse_if_stuck(self, device: str) -> None:
        """Conflict when a write for ``device`` is still stuck in the kernel."""
        if (old := self.stuck.get(device)) is not None:
            raise Conflict(
                f"writing {old.value!r} to {old.path} has been stuck in the kernel for "
                f"{time.time() - old.since:.0f} s; nothing more is written to {device} until "
                "it returns (see `dmesg`; a reboot of the host clears it)")

    def _stuck(self, device: str, write: StuckWrite, done: asyncio.Future[None]) -> None:
        self.stuck[device] = write
        log.error("writing %r to %s is stuck in the kernel; %s gets no more writes until it "
                  "returns", write.value, write.path, device)

        def returned(f: asyncio.Future[None]) -> None:
            self.stuck.pop(device, None)
            error = f.exception()
            log.warning("the stuck write of %r to %s returned after %.0f s (%s); check %s with "
                        "`phyllome hw show %s`", write.value, write.path,
                        time.time() - write.since, error or "ok", device, device)

        done.add_done_callback(returned)

    # -- devices ------------------------------------------------------------------------------

    def addresses(self) -> list[str]:
        """Every PCI function's address (pyudev lists them where the root is /sys)."""
        if self.real:
            import pyudev

            return sorted(d.sys_name for d in pyudev.Context().list_devices(subsystem="pci"))
        return sorted(self.listdir("bus/pci/devices"))

    def read_device(self, addr: str,
                    attached: dict[str, dict[str, list[str]]] | None = None) -> PciDevice:
        """One function as the kernel shows it (ids, driver, group …), names left empty.

        A missing or unreadable attribute is listed in ``problems``; the rest is still read.
        ``attached`` is ``attached()`` read once for a whole scan; None reads it afresh.
        """
        rel = f"bus/pci/devices/{addr}"
        try:
            names = set(os.listdir(f"{self._pci}/{addr}"))
        except FileNotFoundError:
            raise NotFound(f"no PCI device {addr} on this host (see `phyllome hw list`)") from None
        problems: list[str] = []

        def read(name: str, required: bool = True) -> str:
            if name not in names:
                if required:
                    problems.append(f"{name}: missing")
                return ""
            try:  # os.open/os.read: a third of open()'s cost, and sysfs files are small
                fd = os.open(f"{self._pci}/{addr}/{name}", os.O_RDONLY)
                try:
                    return os.read(fd, 65536).decode(errors="replace").strip()
                finally:
                    os.close(fd)
            except OSError as e:
                problems.append(f"{name}: unreadable ({e.strerror or e})")
                return ""

        if attached is None:
            attached = self.attached()
        uevent: dict[str, str] = {}
        for line in read("uevent").splitlines():
            key, _, value = line.partition("=")
            uevent[key] = value
        vendor = device = sub_vendor = sub_device = ""
        if "PCI_ID" in uevent and "PCI_SUBSYS_ID" in uevent:
            vendor, _, device = uevent["PCI_ID"].lower().partition(":")
            sub_vendor, _, sub_device = uevent["PCI_SUBSYS_ID"].lower().partition(":")
        else:
            vendor, device = read("vendor")[2:], read("device")[2:]
            sub_vendor = read("subsystem_vendor", False)[2:]
            sub_device = read("subsystem_device", False)[2:]
        cls = uevent.get("PCI_CLASS", "").lower().zfill(6) if "PCI_CLASS" in uevent else (
            read("class")[2:])
        driver = uevent["DRIVER"] if "DRIVER" in uevent else (
            self.link_name(f"{rel}/driver") or "" if "driver" in names else "")
        group = self.link_name(f"{rel}/iommu_group") if "iommu_group" in names else None
        numa = read("numa_node", False)
        sriov = "sriov_totalvfs" in names
        return PciDevice(
            address=addr, vendor_id=vendor, device_id=device, subsystem_vendor_id=sub_vendor,
            subsystem_device_id=sub_device, class_code=cls, driver=driver,
            iommu_group=int(group) if group is not None else None,
            boot_vga=read("boot_vga", False) == "1",
            numa_node=int(numa) if numa.lstrip("-").isdigit() and numa != "-1" else None,
            reset_methods=read("reset_method", False).split(),
            sriov_totalvfs=int(read("sriov_totalvfs") or 0) if sriov else 0,
            sriov_numvfs=int(read("sriov_numvfs") or 0) if sriov else 0,
            physfn=(self.link_name(f"{rel}/physfn") or "") if "physfn" in names else "",
            virtfns=sorted((self.link_name(f"{rel}/{n}") or "" for n in names
                            if n.startswith("virtfn")), key=str) if sriov else [],
            mdev_types=self._mdev_types(rel) if "mdev_supported_types" in names else [],
            usb=[u for n in sorted(n for n in names if n[:3] == "usb" and n[3:].isdigit())
                 for u in self._usb(f"{rel}/{n}")],
            block=sorted(attached["block"].get(addr, [])),
            net=sorted(attached["net"].get(addr, [])),
            problems=problems)

    def _mdev_types(self, rel: str) -> list[MdevType]:
        out = []
        for tid in sorted(self.listdir(f"{rel}/mdev_supported_types")):
            t = f"{rel}/mdev_supported_types/{tid}"
            avail = self.attr(f"{t}/available_instances") or "0"
            out.append(MdevType(
                id=tid, name=self.attr(f"{t}/name") or "",
                description=self.attr(f"{t}/description") or "",
                available_instances=int(avail) if avail.isdigit() else 0,
                device_api=self.attr(f"{t}/device_api") or "",
                instances=sorted(self.listdir(f"{t}/devices"))))
        return out

    def _usb(self, hub: str) -> list[UsbDevice]:
        """The USB devices below a root hub (not the hub itself), depth first."""
        out = []
        for name in sorted(self.listdir(hub)):
            if not name[0].isdigit() or ":" in name:
                continue
            d = f"{hub}/{name}"
            dev_cls = self.attr(f"{d}/bDeviceClass") or ""
            intf = {self.attr(f"{d}/{i}/bInterfaceClass") for i in self.listdir(d) if ":" in i}
            kind = ("hub" if dev_cls == "09" else
                    "bluetooth" if "e0" in ({dev_cls} | intf) else "other")
            out.append(UsbDevice(
                port=name, vendor_id=self.attr(f"{d}/idVendor") or "",
                product_id=self.attr(f"{d}/idProduct") or "",
                manufacturer=self.attr(f"{d}/manufacturer") or "",
                product=self.attr(f"{d}/product") or "", kind=kind))
            out += self._usb(d)
        return out

    def attached(self) -> dict[str, dict[str, list[str]]]:
        """Disks and network interfaces by the PCI function they hang off:
        ``{"block": {addr: ["sda"]}, "net": {addr: ["eno1"]}}`` (partitions left out)."""
        out: dict[str, dict[str, list[str]]] = {"block": {}, "net": {}}
        for cls, found in out.items():
            for name in self.listdir(f"class/{cls}"):
                if cls == "block" and self.exists(f"class/block/{name}/partition"):
                    continue
                addrs = _ADDR_IN_PATH.findall(os.path.realpath(self.path(f"class/{cls}/{name}")))
                if addrs:
                    found.setdefault(addrs[-1], []).append(name)
        return out

    def root_disk_address(self) -> str | None:
        """The PCI function whose disk holds ``/`` (its storage controller), if any."""
        if not self.root_dev:
            return None
        found = _ADDR_IN_PATH.findall(os.path.realpath(self.path(f"dev/block/{self.root_dev}")))
        return found[-1] if found else None

    def iommu_on(self) -> bool:
        return bool(self.listdir("class/iommu")) or bool(self.listdir("kernel/iommu_groups"))

    def monitor(self) -> UeventMonitor | None:
        """Kernel uevents, where the root is the real /sys (a tree has none)."""
        return UeventMonitor() if self.real else None

    def driver(self, addr: str) -> str:
        return self.link_name(f"bus/pci/devices/{addr}/driver") or ""

    def driver_loaded(self, name: str) -> bool:
        return os.path.isdir(self.path(f"bus/pci/drivers/{name}"))

    # -- host ---------------------------------------------------------------------------------

    def cpu(self) -> CpuInfo:
        """Vendor and flags from the cpu modalias (works on trees); model from /proc/cpuinfo."""
        alias = self.attr("devices/system/cpu/modalias") or ""
        m = re.search(r"ven([0-9A-Fa-f]{4})", alias)
        vendor = _VENDORS.get(int(m.group(1), 16), "other") if m else "other"
        feats = alias.partition(":feature:")[2].split(",")
        flags = {_FEATURES[int(f, 16)] for f in feats if f and int(f, 16) in _FEATURES}
        model = ""
        if self.proc:
            try:
                text = Path(self.proc, "cpuinfo").read_text()
            except OSError:
                text = ""
            for line in text.partition("\n\n")[0].splitlines():  # the first CPU
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":  # the kernel's own words, beside the alias
                    flags |= {f for f in value.split() if f in _FEATURES.values()}
        arch = platform.machine() if self.real else (
            "x86_64" if alias.startswith("cpu:type:x86") else alias[9:].partition(",")[0])
        return CpuInfo(arch=arch, vendor=vendor, model=model, flags=frozenset(flags))

    def kvm_modules(self) -> dict[str, dict[str, str]]:
        """Loaded ``kvm*`` modules and their parameters (``nested``, ``sev``, ``tdx`` …)."""
        out = {}
        for mod in self.listdir("module"):
            if mod.startswith("kvm"):
                params = self.listdir(f"module/{mod}/parameters")
                out[mod] = {p: self.attr(f"module/{mod}/parameters/{p}") or ""
                            for p in params if p in ("nested", "sev", "sev_es", "sev_snp", "tdx")}
        return out

    def kvm_device(self) -> bool:
        return self.exists("class/misc/kvm")

    def cmdline(self) -> str:
        if not self.proc:
            return ""
        try:
            return Path(self.proc, "cmdline").read_text().strip()
        except OSError:
            return ""

    def vfio_users(self, group: int) -> list[str]:
        """Processes holding ``/dev/vfio/<group>`` open (a VM using the group), as text."""
        if not self.proc:
            return []
        target = f"/dev/vfio/{group}"
        users = []
        for pid in os.listdir(self.proc):
            if not pid.isdigit():
                continue
            fd_dir = f"{self.proc}/{pid}/fd"
            try:
                fds = os.listdir(fd_dir)
            except OSError:
                continue
            for fd in fds:
                try:
                    if os.readlink(f"{fd_dir}/{fd}") == target:
                        users.append(f"pid {pid} ({self._process_name(pid)})")
                        break
                except OSError:
                    continue
        return users

    def _process_name(self, pid: str) -> str:
        try:
            args = Path(self.proc, pid, "cmdline").read_bytes().split(b"\0")
        except OSError:
            return "?"
        words = [a.decode(errors="replace") for a in args if a]
        for i, a in enumerate(words[:-1]):
            if a == "-name":  # QEMU: -name guest=vm1,debug-threads=on
                return f"VM {words[i + 1].removeprefix('guest=').split(',')[0]}"
        return os.path.basename(words[0]) if words else "?"


def _device_of(rel: str, value: str) -> str:
    """The device a write acts on: the PCI address in the value (``unbind``) or in the path
    (``driver_override``, ``sriov_numvfs``, mdev ``create``), else the file's directory."""
    found = _ADDR_IN_PATH.findall(value) or _ADDR_IN_PATH.findall(rel)
    return found[0] if found else rel.rsplit("/", 1)[0]


class UeventMonitor:
    """Kernel uevents of PCI devices (and of USB devices, as their controller's), via pyudev.

    ``drain()`` is called when ``fileno()`` is readable; it yields (action, PCI address).
    """

    def __init__(self) -> None:
        import pyudev

        self._mon = pyudev.Monitor.from_netlink(pyudev.Context(), source="kernel")
        self._mon.start()

    def fileno(self) -> int:
        return int(self._mon.fileno())

    def drain(self) -> list[tuple[str, str]]:
        out = []
        while (dev := self._mon.poll(timeout=0)) is not None:
            if dev.subsystem == "pci":
                out.append((dev.action or "change", dev.sys_name))
            elif dev.subsystem == "usb" and (found := _ADDR_IN_PATH.findall(dev.device_path)):
                out.append(("change", found[-1]))
        return out
