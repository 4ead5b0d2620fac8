"""Passthrough readiness: the verdict a VFIO expert gives each device, with reasons.

Pure functions over ``PciDevice`` lists (no I/O), so every rule is tested on its own::

    ctx = context(devices, iommu=True, iommu_hint="", root_disk="0000:00:17.0")
    verdicts = assess(devices, ctx)
    verdicts["0000:01:00.0"].verdict          # 'with-companions'

Rules:
- bridges (host bridges, PCI-to-PCI bridges, root ports) are ignored: vfio-pci leaves them
  to pcieport, and they have no verdict;
- companions are other functions of the same physical device (same domain:bus:slot, same
  vendor): a GPU's HDMI audio, USB and USB-C controllers. A slot that holds chipset platform
  functions (LPC/ISA bridge, SMBus, SATA/IDE, memory controller, PCH Wi-Fi) is the chipset:
  its functions are never companions of each other;
- anything else in the group is unrelated: the device shares its group.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import msgspec

from shared.messages.hardware import (
    DeviceKind,
    Gpu,
    GpuVendor,
    Passthrough,
    PciDevice,
    Verdict,
)

BRIDGES = {0x0600, 0x0604, 0x0609}
# Functions that only a chipset has; a slot holding one is the chipset, not a card.
PLATFORM = {0x0601, 0x0C05, 0x0106, 0x0101, 0x0500, 0x0580, 0x0280}
GPU_VENDORS: dict[str, GpuVendor] = {"8086": "intel", "1002": "amd", "1022": "amd",
                                     "10de": "nvidia"}


def class16(dev: PciDevice) -> int:
    try:
        return int(dev.class_code or "0", 16) >> 8
    except ValueError:
        return 0


def kind_of(class_code: str) -> DeviceKind:
    try:
        c = int(class_code or "0", 16) >> 8
    except ValueError:
        return "other"
    if c >> 8 == 0x03:
        return "gpu"
    if c in (0x0401, 0x0403):
        return "audio"
    if c == 0x0C03:
        return "usb"
    if c >> 8 == 0x02:
        return "net"
    if c >> 8 == 0x01:
        return "storage"
    if c in BRIDGES:
        return "bridge"
    return "other"


def is_bridge(dev: PciDevice) -> bool:
    return class16(dev) in BRIDGES


def slot(addr: str) -> str:
    return addr.rsplit(".", 1)[0]


def iommu_hint(cpu_vendor: str, *, hypervisor_guest: bool, cmdline: str) -> str:
    """What turns the IOMMU on for this CPU vendor (and this host, if it is itself a VM)."""
    params = cmdline.split()
    off = [p for p in params if p in ("intel_iommu=off", "amd_iommu=off", "iommu=off")]
    parts = []
    if off:
        parts.append(f"remove {' '.join(off)} from the kernel command line")
    if cpu_vendor == "intel":
        parts.append("enable VT-d in the firmware setup and add `intel_iommu=on iommu=pt` to "
                     "the kernel command line (GRUB_CMDLINE_LINUX), then reboot")
    elif cpu_vendor == "amd":
        parts.append("enable AMD-Vi (IOMMU) in the firmware setup; AMD kernels turn it on by "
                     "default (no `amd_iommu=on` needed); add `iommu=pt` to the kernel command "
                     "line for passthrough hosts, then reboot")
    else:
        parts.append("enable the IOMMU in the firmware setup and the kernel (`iommu=pt`)")
    if hypervisor_guest:
        parts.append("this host is itself a virtual machine: its hypervisor must give it a "
                     "virtual IOMMU (QEMU q35: `-device intel-iommu,intremap=on`, "
                     "`-device amd-iommu` or `-device virtio-iommu-pci`)")
    return "IOMMU is off: " + "; ".join(parts)


def _label(dev: PciDevice) -> str:
    what = dev.name or dev.class_name or f"[{dev.vendor_id}:{dev.device_id}]"
    return f"{dev.address} ({what})"


def _losses(dev: PciDevice, *, root_disk: str | None, only_nic: str | None) -> list[str]:
    out = []
    if dev.address == root_disk:
        disks = f" ({', '.join(dev.block)})" if dev.block else ""
        out.append(f"{dev.address} holds the host's root filesystem{disks}")
    if dev.boot_vga:
        out.append(f"{dev.address} is the host's boot GPU: the host loses its console")
    if dev.address == only_nic:
        out.append(f"{dev.address} is the host's only network controller")
    return out


class Context(msgspec.Struct, frozen=True, kw_only=True):
    """What a verdict needs to know beyond the device's own group (built from all devices)."""

    iommu: bool
    iommu_hint: str = ""
    root_disk: str | None = None
    only_nic: str | None = None
    chipset: frozenset[str] = frozenset()  # slots that hold chipset platform functions


def is_nic(dev: PciDevice) -> bool:
    """A network controller of the host's own (a VF does not count)."""
    return class16(dev) >> 8 == 0x02 and not dev.physfn


def context(devices: Iterable[PciDevice], *, iommu: bool, iommu_hint: str,
            root_disk: str | None) -> Context:
    nics = []
    chipset = set()
    for d in devices:
        c = class16(d)
        if c in PLATFORM:
            chipset.add(slot(d.address))
        if c >> 8 == 0x02 and not d.physfn:
            nics.append(d.address)
    return Context(iommu=iommu, iommu_hint=iommu_hint, root_disk=root_disk,
                   only_nic=nics[0] if len(nics) == 1 else None, chipset=frozenset(chipset))


def assess(devices: list[PciDevice], ctx: Context) -> dict[str, Passthrough]:
    """The passthrough verdict of every non-bridge device in ``devices``, by address.

    ``devices`` must hold every member of each device's IOMMU group (a whole inventory,
    or the groups that changed).
    """
    devices = sorted(devices, key=lambda d: d.address)
    groups: dict[int, list[PciDevice]] = defaultdict(list)
    for d in devices:
        if d.iommu_group is not None:
            groups[d.iommu_group].append(d)
    iommu, root_disk, only_nic, chipset = ctx.iommu, ctx.root_disk, ctx.only_nic, ctx.chipset

    out = {}
    for dev in devices:
        if is_bridge(dev):
            continue
        if not iommu or dev.iommu_group is None:
            reason = ctx.iommu_hint if not iommu else (
                f"{dev.address} has no IOMMU group although the IOMMU is on: the firmware "
                "does not list it for translation; it cannot be passed through")
            out[dev.address] = Passthrough(
                verdict="no-iommu", reasons=[reason],
                host_loses=_losses(dev, root_disk=root_disk, only_nic=only_nic))
            continue
        others = [o for o in groups[dev.iommu_group] if o.address != dev.address
                  and not is_bridge(o)]
        same_card = slot(dev.address) not in chipset
        companions = [o for o in others if same_card and slot(o.address) == slot(dev.address)
                      and o.vendor_id == dev.vendor_id]
        shares = [o for o in others if o not in companions]
        losses = [x for m in [dev, *others]
                  for x in _losses(m, root_disk=root_disk, only_nic=only_nic)]
        g = dev.iommu_group
        verdict: Verdict
        if shares:
            verdict = "shared-group"
            reasons = [f"IOMMU group {g} also holds unrelated devices: "
                       f"{', '.join(_label(o) for o in shares)}; passing {dev.address} means "
                       "passing all of them (bind with --force), or move the card to a slot "
                       "with its own group"]
        elif companions:
            verdict = "with-companions"
            reasons = [f"IOMMU group {g} holds other functions of the same device: "
                       f"{', '.join(_label(o) for o in companions)}; pass them together"]
        else:
            verdict = "isolated"
            reasons = [f"alone in IOMMU group {g}"
                       + (" (with PCI bridges, which stay with the host)"
                          if len(groups[g]) > 1 else "")]
        if losses:
            reasons.append("passing it would take from the host: " + "; ".join(losses))
        out[dev.address] = Passthrough(
            verdict=verdict, companions=[o.address for o in companions],
            shares_with=[o.address for o in shares], host_loses=losses, reasons=reasons)
    return out


def gpu_view(devices: list[PciDevice]) -> list[Gpu]:
    """Display-class devices, with the handoff a single-GPU passthrough needs."""
    gpus = [d for d in devices if class16(d) >> 8 == 0x03 and not d.physfn]
    out = []
    for d in gpus:
        vendor = GPU_VENDORS.get(d.vendor_id, "other")
        only = len(gpus) == 1
        handoff = _handoff(d, vendor) if (only or d.boot_vga) else []
        out.append(Gpu(address=d.address, vendor=vendor, name=d.name, driver=d.driver,
                       boot_vga=d.boot_vga, only_gpu=only, handoff=handoff))
    return out


def _handoff(d: PciDevice, vendor: GpuVendor) -> list[str]:
    steps = [
        "the host loses its display while the VM runs (single-GPU passthrough): first stop "
        "the display manager and everything that uses the GPU",
        f"`phyllome hw bind {d.address} --single-gpu` then unbinds the virtual consoles and "
        "the EFI/simple framebuffer and moves the GPU and its companions to vfio-pci",
    ]
    if vendor == "nvidia":
        steps.append("nvidia_drm holds the GPU while any client uses it (the unbind then "
                     "blocks); as the boot GPU its VBIOS may be shadowed: give the VM a clean "
                     "ROM dump if the guest shows no picture")
    elif vendor == "amd":
        steps.append("some AMD GPUs (Polaris, Vega, Navi 10) do not reset between VM runs "
                     "without the vendor-reset module")
    elif vendor == "intel":
        steps.append("an Intel iGPU given whole (GVT-d) needs the IGD OpRegion in the VM; "
                     "GVT-g/SR-IOV mdevs keep the host's display instead")
    steps.append(f"after the VM stops, `phyllome hw release {d.address}` gives back the "
                 "driver, the framebuffer and the consoles; then start the display manager")
    return steps
