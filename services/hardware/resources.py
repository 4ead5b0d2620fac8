"""What this host has for VMs, measured before each heartbeat of the hardware agent: CPUs,
memory, UEFI / Secure Boot firmware, swtpm, the guest architectures it has QEMU and firmware
for (``shared.archs``), and the devices a VM can be given. Placement and
migration read it from KV ``hosts`` instead of asking the host::

    agent.on_beat(measure)      # service.setup: HostResources into the heartbeat
    host_resources(inventory.devices())   # HostResources(cpus=8, devices=[...], mdevs=[...])
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from shared import archs
from shared.messages.hardware import HostResources, MdevRoom, PassableDevice, PciDevice

OVMF_DIRS = ("/usr/share/OVMF", "/usr/share/edk2/ovmf", "/usr/share/qemu")


def memory_bytes(meminfo: str) -> tuple[int, int]:
    """(MemTotal, MemAvailable) in bytes from the text of ``/proc/meminfo``."""
    values = {}
    for line in meminfo.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[name] = int(parts[0]) * 1024
    return values.get("MemTotal", 0), values.get("MemAvailable", values.get("MemFree", 0))


def passable(devices: Iterable[PciDevice]) -> list[PassableDevice]:
    """The functions a VM can be given now, by the rule the vm agent applies when a VM asks
    for one: bound to vfio-pci already (alone), or isolated or with its card's companions,
    taking nothing from the host (boot GPU, root disk, only NIC)."""
    out = []
    for d in devices:
        p = d.passthrough
        if d.driver == "vfio-pci":
            companions: list[str] = []
        elif p is not None and p.verdict in ("isolated", "with-companions") and not p.host_loses:
            companions = p.companions
        else:
            continue
        out.append(PassableDevice(address=d.address, kind=d.kind, name=d.name,
                                  companions=companions, physfn=d.physfn))
    return out


def mdev_rooms(devices: Iterable[PciDevice]) -> list[MdevRoom]:
    """Every mediated-device type of every parent, with the devices made and room for more."""
    return [MdevRoom(parent=d.address, mdev_type=t.id, name=t.name,
                     available=t.available_instances, instances=t.instances)
            for d in devices for t in d.mdev_types]


def host_resources(devices: list[PciDevice]) -> HostResources:
    """This machine's CPUs, memory, firmware and swtpm, and what of ``devices`` VMs can have."""
    total, available = memory_bytes(Path("/proc/meminfo").read_text())
    ovmf = [p for d in OVMF_DIRS if Path(d).is_dir() for p in Path(d).iterdir()]
    return HostResources(
        cpus=os.cpu_count() or 1, memory_total_bytes=total, memory_available_bytes=available,
        uefi=any("CODE" in p.name or p.suffix == ".json" for p in ovmf),
        secure_boot=any(".ms." in p.name or "secboot" in p.name for p in ovmf),
        tpm=shutil.which("swtpm") is not None,
        devices=passable(devices), mdevs=mdev_rooms(devices), guest_archs=archs.guest_archs())
