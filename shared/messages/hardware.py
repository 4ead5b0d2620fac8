"""Messages and endpoints of the hardware agent: inventory, readiness, VFIO, mdev, SR-IOV.

    >>> from shared.codec import encode
    >>> encode(DeviceRef(address="0000:01:00.0"))
    b'{"type":"hw.device_ref.v1","address":"0000:01:00.0"}'
"""

from __future__ import annotations

from typing import Literal

import msgspec

from shared.messages import Ack, Empty, EndpointSpec, Event
from shared.messages.jobs import JobAccepted, job_endpoints

Verdict = Literal["isolated", "with-companions", "shared-group", "no-iommu"]
GpuVendor = Literal["intel", "amd", "nvidia", "other"]
DeviceKind = Literal["gpu", "audio", "usb", "net", "storage", "bridge", "other"]
ProbeResult = Literal["passed", "failed", "not-run"]


class UsbDevice(msgspec.Struct, frozen=True, kw_only=True, tag="hw.usb_device.v1"):
    """A USB device behind a controller; ``kind`` is ``bluetooth``, ``hub`` or ``other``."""

    port: str
    vendor_id: str
    product_id: str
    manufacturer: str = ""
    product: str = ""
    kind: str = "other"


class MdevType(msgspec.Struct, frozen=True, kw_only=True, tag="hw.mdev_type.v1"):
    """One mediated-device type a parent offers (``mdev_supported_types/<id>``)."""

    id: str
    name: str = ""
    description: str = ""
    available_instances: int = 0
    device_api: str = ""
    instances: list[str] = []


class Passthrough(msgspec.Struct, frozen=True, kw_only=True, tag="hw.passthrough.v1"):
    """Whether a device can be given to a VM, and what else must go with it.

    ``companions``: other functions of the same physical device, to pass together.
    ``shares_with``: unrelated devices in the same IOMMU group (passing needs them too).
    ``host_loses``: what the host would lose (boot disk, boot GPU, only network controller).
    """

    verdict: Verdict
    companions: list[str] = []
    shares_with: list[str] = []
    host_loses: list[str] = []
    reasons: list[str] = []


class PciDevice(msgspec.Struct, frozen=True, kw_only=True, tag="hw.pci_device.v1"):
    address: str
    vendor_id: str
    device_id: str
    subsystem_vendor_id: str = ""
    subsystem_device_id: str = ""
    class_code: str = ""
    vendor: str = ""
    name: str = ""
    subsystem: str = ""
    class_name: str = msgspec.field(default="", name="class")
    kind: DeviceKind = "other"
    driver: str = ""
    iommu_group: int | None = None
    boot_vga: bool = False
    numa_node: int | None = None
    reset_methods: list[str] = []
    sriov_totalvfs: int = 0
    sriov_numvfs: int = 0
    physfn: str = ""
    virtfns: list[str] = []
    mdev_types: list[MdevType] = []
    usb: list[UsbDevice] = []
    block: list[str] = []
    net: list[str] = []
    passthrough: Passthrough | None = None
    problems: list[str] = []


class IommuGroup(msgspec.Struct, frozen=True, kw_only=True, tag="hw.iommu_group.v1"):
    id: int
    devices: list[str]


class Gpu(msgspec.Struct, frozen=True, kw_only=True, tag="hw.gpu.v1"):
    """A display-class device; ``handoff`` says what single-GPU passthrough must do."""

    address: str
    vendor: GpuVendor
    name: str = ""
    driver: str = ""
    boot_vga: bool = False
    only_gpu: bool = False
    handoff: list[str] = []


class HostCaps(msgspec.Struct, frozen=True, kw_only=True, tag="hw.host_caps.v1"):
    """What this host can do for VMs.

    ``kvm_ioctl`` is only the ioctl-level check (a few real-mode instructions to an I/O exit
    and HLT); ``kvm_usable`` is true only when the VM agent's boot probe (a real guest
    booted under KVM) passed, because the first can pass where the second hangs.
    """

    arch: str
    cpu_vendor: str = "other"
    cpu_model: str = ""
    virt_extension: str = ""
    hypervisor_guest: bool = False
    kvm_device: bool = False
    kvm_modules: list[str] = []
    kvm_ioctl: ProbeResult = "not-run"
    kvm_ioctl_detail: str = ""
    kvm_ioctl_ms: float = 0.0
    kvm_boot_probe: ProbeResult = "not-run"
    kvm_usable: bool = False
    nested: bool | None = None
    iommu: bool = False
    iommu_hint: str = ""
    sev: bool = False
    sev_es: bool = False
    sev_snp: bool = False
    tdx: bool = False
    sgx: bool = False
    vfio_pci_loaded: bool = False


class PassableDevice(msgspec.Struct, frozen=True, kw_only=True, tag="hw.passable.v1"):
    """A PCI function this host can give a VM now: bound to vfio-pci already, or bindable
    without taking anything from the host. ``companions`` are the other functions of its
    card, which go with it; ``physfn`` is set on an SR-IOV VF (its PF)."""

    address: str
    kind: DeviceKind
    name: str = ""
    companions: list[str] = []
    physfn: str = ""


class MdevRoom(msgspec.Struct, frozen=True, kw_only=True, tag="hw.mdev_room.v1"):
    """One mediated-device type of one parent: the devices made of it, and room for more."""

    parent: str
    mdev_type: str
    name: str = ""
    available: int = 0
    instances: list[str] = []


class GuestArch(msgspec.Struct, frozen=True, kw_only=True, tag="hw.guest_arch.v1"):
    """One architecture of guests this host can run: its QEMU and the UEFI firmware that
    libvirt would pick for it (QEMU's firmware descriptors; ``shared.archs``)."""

    arch: str  # x86_64, aarch64
    emulator: str = ""  # path of qemu-system-<arch> ("": not installed)
    uefi: bool = False  # a UEFI build for the arch's machine (OVMF, AAVMF)
    secure_boot: bool = False  # one with Secure Boot on and Microsoft's keys enrolled


class HostResources(msgspec.Struct, frozen=True, kw_only=True, tag="hw.host_resources.v1"):
    """What this host has for VMs, measured before each heartbeat of its hardware agent:
    placement and migration read it from KV ``hosts`` instead of asking the host."""

    cpus: int = 0
    memory_total_bytes: int = 0
    memory_available_bytes: int = 0
    uefi: bool = False  # OVMF firmware
    secure_boot: bool = False  # OVMF with Microsoft keys (.ms)
    tpm: bool = False  # swtpm
    devices: list[PassableDevice] = []
    mdevs: list[MdevRoom] = []
    guest_archs: list[GuestArch] = []  # empty from hosts before it: x86_64 only


class StuckWrite(msgspec.Struct, frozen=True, kw_only=True, tag="hw.stuck_write.v1"):
    """A sysfs write that outlived its deadline: its thread is still inside the kernel."""

    path: str
    value: str
    since: float  # time.time() when it started


class HwReport(msgspec.Struct, frozen=True, kw_only=True, tag="hw.report.v1"):
    """Everything ``phyllome hw report`` prints: caps, devices, groups, GPUs, problems."""

    host: HostCaps
    devices: list[PciDevice]
    groups: list[IommuGroup]
    gpus: list[Gpu]
    problems: list[str] = []


# -- requests and replies ---------------------------------------------------------------------


class DeviceQuery(msgspec.Struct, frozen=True, kw_only=True, tag="hw.device_query.v1"):
    kind: DeviceKind | None = None


class DeviceList(msgspec.Struct, frozen=True, kw_only=True, tag="hw.device_list.v1"):
    devices: list[PciDevice]


class GroupList(msgspec.Struct, frozen=True, kw_only=True, tag="hw.group_list.v1"):
    iommu: bool
    groups: list[IommuGroup]
    hint: str = ""


class DeviceRef(msgspec.Struct, frozen=True, kw_only=True, tag="hw.device_ref.v1"):
    address: str


class BindRequest(msgspec.Struct, frozen=True, kw_only=True, tag="hw.bind.v1"):
    """Bind ``address`` and its group to vfio-pci.

    ``force`` passes a shared group whole; ``single_gpu`` allows the boot GPU.
    """

    address: str
    force: bool = False
    single_gpu: bool = False


class MdevCreate(msgspec.Struct, frozen=True, kw_only=True, tag="hw.mdev_create.v1"):
    address: str
    mdev_type: str
    uuid: str = ""


class MdevRef(msgspec.Struct, frozen=True, kw_only=True, tag="hw.mdev_ref.v1"):
    uuid: str


class MdevInfo(msgspec.Struct, frozen=True, kw_only=True, tag="hw.mdev_info.v1"):
    uuid: str
    parent: str
    mdev_type: str


class SriovSet(msgspec.Struct, frozen=True, kw_only=True, tag="hw.sriov_set.v1"):
    address: str
    num_vfs: int


class BootProbe(msgspec.Struct, frozen=True, kw_only=True, tag="hw.boot_probe.v1"):
    """The VM agent's verdict after booting a real guest under KVM (or failing to)."""

    result: ProbeResult
    detail: str = ""


# -- events -----------------------------------------------------------------------------------


class DeviceAdded(Event, frozen=True, kw_only=True, tag="hw.device_added.v1"):
    device: PciDevice


class DeviceChanged(Event, frozen=True, kw_only=True, tag="hw.device_changed.v1"):
    device: PciDevice
    action: str = "change"


class DeviceRemoved(Event, frozen=True, kw_only=True, tag="hw.device_removed.v1"):
    address: str


LIST = EndpointSpec(
    "hardware", "list", DeviceQuery, DeviceList,
    "PCI devices, optionally of one kind.")
DEVICE = EndpointSpec(
    "hardware", "device", DeviceRef, PciDevice,
    "One PCI device with its readiness.")
GROUPS = EndpointSpec("hardware", "groups", Empty, GroupList, "IOMMU groups and their members.")
CAPS = EndpointSpec(
    "hardware", "caps", Empty, HostCaps,
    "Host capabilities (KVM, nested, IOMMU, SEV/TDX).")
REPORT = EndpointSpec("hardware", "report", Empty, HwReport, "The full readiness report.")
BIND = EndpointSpec(
    "hardware", "bind", BindRequest, JobAccepted,
    "Bind a device and its group to vfio-pci (a job; rolls back on failure).")
RELEASE = EndpointSpec(
    "hardware", "release", DeviceRef, JobAccepted,
    "Give a bound group back to its original drivers (a job).")
MDEV_CREATE = EndpointSpec(
    "hardware", "mdev_create", MdevCreate, MdevInfo,
    "Create a mediated device.")
MDEV_REMOVE = EndpointSpec("hardware", "mdev_remove", MdevRef, Ack, "Remove a mediated device.")
SRIOV_SET = EndpointSpec(
    "hardware", "sriov_set", SriovSet, PciDevice,
    "Set the number of SR-IOV VFs of a PF.")
BOOT_PROBE = EndpointSpec(
    "hardware", "boot_probe", BootProbe, HostCaps,
    "Record the VM agent's KVM boot-probe result in the host capabilities.")
JOBS, JOB, CANCEL = job_endpoints("hardware")

# What the hardware agent serves; the job endpoints are added by the agent runtime.
ENDPOINTS = (LIST, DEVICE, GROUPS, CAPS, REPORT, BIND, RELEASE, MDEV_CREATE, MDEV_REMOVE,
    SRIOV_SET, BOOT_PROBE)
