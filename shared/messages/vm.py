"""Messages and endpoints of the vm agent: VM specs, lifecycle requests, state events.

A ``VmSpec`` is what the operator asks for; the agent turns it into a libvirt domain, keeps
a ``VmRecord`` per VM in KV ``vms`` (key: the VM's uuid) and publishes ``VmStateChanged`` on
``phy.evt.<host>.vm.state.<uuid>`` whenever the hypervisor reports (or a reconciliation
finds) a new state.

    >>> from shared.codec import encode
    >>> encode(VmRef(vm="demo"))
    b'{"type":"vm.ref.v1","vm":"demo"}'
"""

from __future__ import annotations

from typing import Literal

import msgspec

from shared.messages import Ack, Empty, EndpointSpec, Event
from shared.messages import net as net_api
from shared.messages.jobs import JobAccepted, job_endpoints
from shared.messages.net import DEFAULT_NETWORK

# Guest architectures: x86_64 on q35; aarch64 on virt (AAVMF), emulated by TCG on x86 hosts.
Arch = Literal["x86_64", "aarch64"]
Machine = Literal["q35", "virt"]
Firmware = Literal["uefi", "bios"]
Tpm = Literal["none", "emulated-2.0"]
Display = Literal["spice", "vnc", "both", "none"]
Sound = Literal["ich9", "none"]
Accelerator = Literal["auto", "kvm", "tcg"]
DiskBus = Literal["virtio", "sata"]
NicKind = Literal["network", "bridge", "user"]
ConsoleKind = Literal["vnc", "serial"]
InputBus = Literal["usb", "virtio"]
Confidential = Literal["none", "sev", "sev-es", "sev-snp", "tdx"]
# Observed states, libvirt's virDomainState in words; "deleted" only in events.
VmState = Literal[
    "running", "blocked", "paused", "shutting-down", "shutoff", "crashed", "pmsuspended",
    "unknown", "deleted",
]


class Disk(msgspec.Struct, frozen=True, kw_only=True):
    """A RAW disk attached as virtio or SATA: a storage-pool volume, or a plain file path.

    With ``pool`` + ``volume`` the agent asks the storage agent for the path (and clones or
    deletes through it); ``path`` is filled in at create.
    """

    path: str = ""
    pool: str = ""
    volume: str = ""
    bus: DiskBus = "virtio"
    readonly: bool = False
    owned: bool = False  # created for this VM (from an image or by clone): delete may remove it


class Nic(msgspec.Struct, frozen=True, kw_only=True):
    """A virtio-net NIC on a libvirt network, a host bridge, or user-mode networking."""

    kind: NicKind = "network"
    source: str = DEFAULT_NETWORK  # network or bridge name; ignored for "user"
    mac: str = ""  # chosen at create (and attach) when empty; kept across restarts


class UsbHostdev(msgspec.Struct, frozen=True, kw_only=True):
    """A host USB device passed through: by ``vendor`` + ``product`` id (4 hex digits each,
    survives replugging) or by ``bus`` + ``device`` number (as ``lsusb`` shows them; they
    change when the device is replugged)."""

    vendor: str = ""
    product: str = ""
    bus: int = 0
    device: int = 0

    def label(self) -> str:
        return f"{self.vendor}:{self.product}" if self.vendor else f"{self.bus}.{self.device}"


class Share(msgspec.Struct, frozen=True, kw_only=True):
    """A host directory the guest mounts with virtio-fs: ``mount -t virtiofs TAG /mnt``.

    ``readonly`` is refused while hosts run QEMU 7.2's C virtiofsd, which cannot export
    read-only (share a read-only bind mount instead)."""

    source: str  # an absolute directory on the VM's host
    tag: str  # what the guest mounts it by
    readonly: bool = False


class CloudInit(msgspec.Struct, frozen=True, kw_only=True):
    """A NoCloud seed for cloud-init: the agent builds it as an ISO9660 volume labelled
    ``cidata`` beside the VM's disks and attaches it read-only as a CD-ROM.

    ``user`` gets ``ssh_keys`` (else they go to the image's default user); ``user_data`` is
    ``#cloud-config`` YAML (merged with the user and hostname) or a script (``#!``).
    ``instance_id`` is chosen at create (a clone gets a new one, a migration keeps it).
    """

    instance_id: str = ""
    hostname: str = ""
    user: str = ""
    ssh_keys: list[str] = []
    user_data: str = ""
    network_config: str = ""


class Cdrom(msgspec.Struct, frozen=True, kw_only=True):
    """A SATA CD-ROM drive holding an ISO9660/UDF image (``path``), or empty (``""``)."""

    path: str = ""


GuestProfile = Literal["generic", "windows"]


class VmSpec(msgspec.Struct, frozen=True, kw_only=True):
    """What a VM should be; the agent owns the libvirt XML it becomes."""

    name: str
    uuid: str = ""  # chosen at create when empty
    arch: Arch = "x86_64"
    machine: Machine = "q35"  # the agent sets "virt" for an aarch64 spec left at q35
    vcpus: int = 2
    memory_mib: int = 1024
    firmware: Firmware = "uefi"
    secure_boot: bool = False
    tpm: Tpm = "none"
    disks: list[Disk] = []
    nics: list[Nic] = []
    display: Display = "vnc"
    listen: str = "127.0.0.1"
    password: str = ""  # VNC allows at most 8 characters
    video: Literal["virtio", "none"] = "virtio"
    sound: Sound = "none"
    usb: bool = True  # qemu-xhci controller + USB tablet
    rng: bool = True  # virtio-rng fed from /dev/urandom
    balloon: bool = True
    guest_agent: bool = True  # the org.qemu.guest_agent.0 virtio-serial channel
    hostdevs: list[str] = []  # PCI addresses (0000:01:00.0) or mdev UUIDs
    usb_hostdevs: list[UsbHostdev] = []  # host USB devices (needs ``usb``)
    nested: bool = False  # host-passthrough CPU, so the guest can run its own VMs
    # "": the host's CPU under KVM, QEMU's most capable model under TCG (x86-64-v2 and up);
    # else "host-passthrough", "maximum" or a named model such as "Nehalem"
    cpu: str = ""
    kernel: str = ""  # direct kernel boot when set
    initrd: str = ""
    cmdline: str = ""
    autostart: bool = False
    accelerator: Accelerator = "auto"
    # VIRTIO 1.2 devices and confidential computing (docs/guests.md)
    shares: list[Share] = []  # virtio-fs; memory is then shared (memfd) for virtiofsd
    vsock: bool = False  # a virtio vsock device; its guest CID is chosen at start
    input: InputBus = "usb"  # tablet (+ keyboard for virtio) on USB or virtio-input
    confidential: Confidential = "none"  # AMD SEV / SEV-ES / SEV-SNP or Intel TDX (KVM)
    cloud_init: CloudInit | None = None
    seed: str = ""  # the cloud-init seed ISO, made by the agent from ``cloud_init``
    cdrom: Cdrom | None = None  # install media; booted before the disks
    profile: GuestProfile = "generic"  # "windows": Hyper-V enlightenments, local clock


class ConsoleEndpoint(msgspec.Struct, frozen=True, kw_only=True):
    """Where a VNC or SPICE client connects."""

    host: str
    port: int
    uri: str


class AcceleratorDecision(msgspec.Struct, frozen=True, kw_only=True, tag="vm.accelerator.v1"):
    """What VMs with ``accelerator: auto`` get on this host, and why (in the vm agent's
    heartbeat; the hardware agent reads ``kvm_usable`` from it when it starts after it)."""

    policy: Literal["auto", "kvm", "tcg"]
    accelerator: Literal["kvm", "tcg"]
    kvm_usable: bool | None = None  # None: not probed (forced by policy)
    note: str = ""
    boot_id: str = ""
    probed_at: float = 0.0
    probe_s: float = 0.0


class MigrationLock(msgspec.Struct, frozen=True, kw_only=True):
    """A VM being migrated: no host starts, changes or deletes it until the job lets go."""

    job_id: str  # the migrate job of the source's vm agent
    source: str
    target: str
    since: float = 0.0  # unix time the lock was taken


class VmRecord(msgspec.Struct, frozen=True, kw_only=True, tag="vm.record.v1"):
    """A VM in KV ``vms`` (key: uuid): its spec, where it lives and what it was last seen doing.

    ``host`` owns the VM: only that host's vm agent starts it, and the record changes only by
    compare-and-set on its KV revision; a migration hands ownership over in one such write.
    """

    spec: VmSpec
    host: str
    migration: MigrationLock | None = None
    state: VmState = "shutoff"
    reason: str = ""
    accelerator: Literal["kvm", "tcg"] = "tcg"  # what the domain runs under
    revision: int = 1  # bumped on every spec change (create = 1, update, ...)
    started_at: float = 0.0  # unix time of the last start, while running or paused
    updated: float = 0.0


AddressSource = Literal["agent", "lease", ""]


class GuestAddress(msgspec.Struct, frozen=True, kw_only=True):
    """One IP address of a running guest: ``nic`` is the interface's name as the source
    reports it (the guest's ``eth0`` from the agent, the host's ``vnet0`` from a lease)."""

    nic: str
    mac: str
    family: Literal["ipv4", "ipv6"]
    address: str
    prefix: int


class VmInfo(msgspec.Struct, frozen=True, kw_only=True, tag="vm.info.v1"):
    """A VM as its host sees it now."""

    name: str
    uuid: str
    host: str
    state: VmState
    reason: str = ""
    accelerator: Literal["kvm", "tcg"]
    accelerator_note: str = ""  # why TCG when KVM was not forced off
    uptime_s: float = 0.0
    vcpus: int
    memory_mib: int
    cpu_time_s: float = 0.0
    memory_rss_bytes: int = 0
    autostart: bool = False
    vnc: ConsoleEndpoint | None = None
    spice: ConsoleEndpoint | None = None
    addresses: list[GuestAddress] = []
    address_source: AddressSource = ""  # the QEMU guest agent, else DHCP leases
    vsock_cid: int = 0  # the guest's vsock address while it runs (0: no vsock, or stopped)
    spec: VmSpec


class VmCreate(msgspec.Struct, frozen=True, kw_only=True, tag="vm.create.v1"):
    """Define a VM; ``image`` asks the catalogue and storage agents for a disk cloned from it,
    ``cdrom_image`` for a pulled ISO put in the CD-ROM drive (``spec.cdrom``), and
    ``disk_size_bytes`` for a blank RAW disk to install onto."""

    spec: VmSpec
    image: str = ""
    cdrom_image: str = ""
    disk_size_bytes: int = 0


class VmRef(msgspec.Struct, frozen=True, kw_only=True, tag="vm.ref.v1"):
    """One VM on this host, by name or uuid."""

    vm: str


class VmShutdown(msgspec.Struct, frozen=True, kw_only=True, tag="vm.shutdown.v1"):
    """ACPI power-off; wait up to ``timeout_s`` for it, then power off hard when ``force``."""

    vm: str
    timeout_s: float = 0.0  # 0: ask and return
    force: bool = False


class VmDelete(msgspec.Struct, frozen=True, kw_only=True, tag="vm.delete.v1"):
    """Undefine with NVRAM and TPM state; ``force`` powers off a running VM first."""

    vm: str
    force: bool = False
    delete_disks: bool = False  # only the disks the VM owns


class VmListRequest(msgspec.Struct, frozen=True, kw_only=True, tag="vm.list_request.v1"):
    all_hosts: bool = False


class VmList(msgspec.Struct, frozen=True, kw_only=True, tag="vm.list.v1"):
    vms: list[VmRecord]


class VmUpdate(msgspec.Struct, frozen=True, kw_only=True, tag="vm.update.v1"):
    """Change a stopped VM; fields left ``None`` keep their value."""

    vm: str
    vcpus: int | None = None
    memory_mib: int | None = None
    display: Display | None = None
    password: str | None = None
    sound: Sound | None = None
    nested: bool | None = None
    cmdline: str | None = None
    autostart: bool | None = None
    accelerator: Accelerator | None = None
    hostdevs: list[str] | None = None
    shares: list[Share] | None = None


class VmClone(msgspec.Struct, frozen=True, kw_only=True, tag="vm.clone.v1"):
    """Copy a stopped VM: new uuid and MACs, NVRAM and TPM state copied, disks cloned."""

    vm: str
    name: str


class VmMigrate(msgspec.Struct, frozen=True, kw_only=True, tag="vm.migrate.v1"):
    """Move a stopped VM to host ``to`` (cold); ``shutdown`` shuts a running one down first."""

    vm: str
    to: str
    shutdown: bool = False
    keep_source: bool = False  # leave the source's disks in place after the move
    bwlimit_bytes_s: int = 0  # per disk stream; 0: as fast as it goes


class VmAttachDisk(msgspec.Struct, frozen=True, kw_only=True, tag="vm.attach_disk.v1"):
    """Add a RAW disk (a pool volume or a path) to a stopped VM, or live to a running one."""

    vm: str
    disk: Disk


class VmDetachDisk(msgspec.Struct, frozen=True, kw_only=True, tag="vm.detach_disk.v1"):
    """Remove a disk, named by its path, ``POOL/VOLUME`` or volume name; the file stays."""

    vm: str
    disk: str


class VmAttachNic(msgspec.Struct, frozen=True, kw_only=True, tag="vm.attach_nic.v1"):
    """Add a NIC (a MAC is chosen when none is given)."""

    vm: str
    nic: Nic


class VmDetachNic(msgspec.Struct, frozen=True, kw_only=True, tag="vm.detach_nic.v1"):
    """Remove the NIC with this MAC."""

    vm: str
    mac: str


class VmAttachUsb(msgspec.Struct, frozen=True, kw_only=True, tag="vm.attach_usb.v1"):
    """Pass a host USB device through."""

    vm: str
    device: UsbHostdev


class VmDetachUsb(msgspec.Struct, frozen=True, kw_only=True, tag="vm.detach_usb.v1"):
    """Give a passed-through USB device back to the host."""

    vm: str
    device: UsbHostdev


class VmInsert(msgspec.Struct, frozen=True, kw_only=True, tag="vm.insert.v1"):
    """Put an ISO (a path, or a pulled catalogue ``image`` of kind iso) in the CD-ROM drive,
    replacing what is there; live on a running VM."""

    vm: str
    path: str = ""
    image: str = ""


class VmGuestState(msgspec.Struct, frozen=True, kw_only=True, tag="vm.guest_state.v1"):
    """A stopped VM's UEFI variables and TPM state, carried from one host to another."""

    uuid: str
    nvram: bytes = b""  # the NVRAM (VARS) file; empty: none yet
    tpm: bytes = b""  # the swtpm state directory as a gzipped tar; empty: none


class VmSnapshotCreate(msgspec.Struct, frozen=True, kw_only=True, tag="vm.snapshot_create.v1"):
    """Snapshot every disk, the NVRAM and the TPM state of a VM; a running one is frozen
    through its guest agent when ``quiesce`` and the agent answers, else paused, for as long
    as the copies take."""

    vm: str
    name: str
    quiesce: bool = False


class VmSnapshotRef(msgspec.Struct, frozen=True, kw_only=True, tag="vm.snapshot_ref.v1"):
    """One snapshot of one VM; ``name`` empty: every snapshot of it (list)."""

    vm: str
    name: str = ""


class VmSnapshotRevert(msgspec.Struct, frozen=True, kw_only=True, tag="vm.snapshot_revert.v1"):
    """Give a stopped VM back its disks, NVRAM, TPM state and spec as they were in the
    snapshot; ``force`` powers a running VM off first."""

    vm: str
    name: str
    force: bool = False


class VmSnapshot(msgspec.Struct, frozen=True, kw_only=True, tag="vm.snapshot.v1"):
    """A snapshot of a VM, kept in the pool of its first disk."""

    vm: str
    uuid: str
    name: str
    created: float
    pool: str
    state: VmState = "shutoff"  # the VM's state when it was taken
    disks: list[str] = []  # pool/volume of every disk copied
    method: Literal["reflink", "copy", "mixed", "none"] = "reflink"  # copy: it was not instant
    allocated_bytes: int = 0
    nvram: bool = False
    tpm: bool = False
    quiesced: bool = False  # the guest agent froze the guest's filesystems
    paused_s: float = 0.0  # how long the guest was frozen or paused for the copies
    seconds: float = 0.0


class VmSnapshotList(msgspec.Struct, frozen=True, kw_only=True, tag="vm.snapshot_list.v1"):
    snapshots: list[VmSnapshot]


class VmBackup(msgspec.Struct, frozen=True, kw_only=True, tag="vm.backup.v1"):
    """Write one backup archive of a VM into the directory ``to`` of its host (a job), from
    a snapshot taken for it, so a running VM keeps running."""

    vm: str
    to: str
    quiesce: bool = False


class VmRestore(msgspec.Struct, frozen=True, kw_only=True, tag="vm.restore.v1"):
    """Define a VM from a backup archive readable on this host (a job). Without ``name`` it
    comes back with its name and uuid; with one, as a copy (new uuid and MACs)."""

    archive: str
    name: str = ""
    pool: str = "default"  # where its disks go


class VmBackupSchedule(msgspec.Struct, frozen=True, kw_only=True,
                       tag="vm.backup_schedule_request.v1"):
    """Back a VM up into ``to`` every ``every_s`` seconds, keeping the newest ``keep``
    archives (0: all); ``every_s`` 0 removes its schedule."""

    vm: str
    to: str = ""
    every_s: float = 0.0
    keep: int = 0


class BackupSchedule(msgspec.Struct, frozen=True, kw_only=True, tag="vm.backup_schedule.v1"):
    """A VM's scheduled backups, run by the vm agent of its host as ``backup`` jobs."""

    uuid: str
    vm: str
    to: str
    every_s: float
    keep: int = 0
    next_run: float = 0.0  # unix time; a run missed while the agent was down runs once
    last_run: float = 0.0
    last_job: str = ""


class BackupScheduleList(msgspec.Struct, frozen=True, kw_only=True,
                         tag="vm.backup_schedules.v1"):
    schedules: list[BackupSchedule]


class ConsoleOpen(msgspec.Struct, frozen=True, kw_only=True, tag="vm.console_open.v1"):
    """Bridge a running VM's VNC display or serial port to a console session over NATS
    (``shared/console.py``), so that a client of any host can use it."""

    vm: str
    kind: ConsoleKind = "vnc"


class ConsoleSession(msgspec.Struct, frozen=True, kw_only=True, tag="vm.console_session.v1"):
    """An open console: bytes to the VM go to ``to_vm``, the VM's come on ``to_client``; the
    client sends first (an ack of 0 bytes), the agent waits for it."""

    session: str
    host: str
    kind: ConsoleKind
    uuid: str
    name: str
    to_vm: str
    to_client: str
    window: int  # bytes either side may send ahead of the other's acknowledgement


SCREENSHOT_WIDTHS = (16, 1920)  # the smallest and largest max_width a screenshot takes


class VmScreenshotRequest(msgspec.Struct, frozen=True, kw_only=True,
                          tag="vm.screenshot_request.v1"):
    """A running VM's screen as a PNG no wider than ``max_width`` pixels (16-1920)."""

    vm: str
    max_width: int = 320


class VmScreenshot(msgspec.Struct, frozen=True, kw_only=True, tag="vm.screenshot.v1"):
    """A PNG of a VM's screen (8-bit grey or RGB, at most 512 KiB), shrunk from the screen's
    ``screen_width`` x ``screen_height`` pixels; ``taken`` is unix time."""

    uuid: str
    name: str
    width: int
    height: int
    screen_width: int
    screen_height: int
    png: bytes
    taken: float


class VmStateChanged(Event, frozen=True, kw_only=True, tag="vm.state_changed.v1"):
    """A VM's state changed; ``event`` is the hypervisor's word (started, stopped, ...)."""

    uuid: str
    name: str
    state: VmState
    event: str = ""
    reason: str = ""
    missed: bool = False  # found by reconciliation rather than reported live


class VmDeviceChanged(Event, frozen=True, kw_only=True, tag="vm.device_changed.v1"):
    """A disk, NIC or USB device was attached or detached; ``live``: the running guest got
    the change at once (else at its next start)."""

    uuid: str
    name: str
    action: Literal["attached", "detached"]
    kind: Literal["disk", "nic", "usb", "cdrom"]
    # the disk's or ISO's path, the NIC's MAC, the USB device's vendor:product or bus.device
    device: str
    live: bool = False


class VmAddressesChanged(Event, frozen=True, kw_only=True, tag="vm.addresses_changed.v1"):
    """A running guest's IP addresses changed (empty when it stopped or lost them)."""

    uuid: str
    name: str
    addresses: list[GuestAddress] = []
    source: AddressSource = ""


class VmSnapshotChanged(Event, frozen=True, kw_only=True, tag="vm.snapshot_changed.v1"):
    """``phy.evt.<host>.vm.snapshot.<uuid>``: a snapshot of the VM was taken, reverted to or
    deleted."""

    uuid: str
    vm: str
    snapshot: str
    change: Literal["created", "reverted", "deleted"]
    method: str = ""
    paused_s: float = 0.0


class AcceleratorFallback(Event, frozen=True, kw_only=True, tag="vm.accelerator_fallback.v1"):
    """KVM was found unusable on this host; VMs run under TCG (slow)."""

    reason: str


CREATE = EndpointSpec(
    "vm", "create", VmCreate, VmInfo,
    "Define a VM from a spec (idempotency key honoured).")
START = EndpointSpec("vm", "start", VmRef, VmInfo, "Start a defined VM.")
SHUTDOWN = EndpointSpec(
    "vm", "shutdown", VmShutdown, VmInfo,
    "ACPI shutdown, optionally forced after a wait.")
DESTROY = EndpointSpec("vm", "destroy", VmRef, VmInfo, "Power off at once.")
REBOOT = EndpointSpec("vm", "reboot", VmRef, VmInfo, "ACPI reboot of a running VM.")
SUSPEND = EndpointSpec("vm", "suspend", VmRef, VmInfo, "Pause a running VM's vCPUs.")
RESUME = EndpointSpec("vm", "resume", VmRef, VmInfo, "Continue a paused VM.")
DELETE = EndpointSpec("vm", "delete", VmDelete, Ack, "Undefine a VM with its NVRAM and TPM state.")
LIST = EndpointSpec(
    "vm", "list", VmListRequest, VmList,
    "VMs from KV vms: this host's or the cluster's.")
INFO = EndpointSpec(
    "vm", "info", VmRef, VmInfo,
    "State, uptime, stats and console endpoints of a VM.")
UPDATE = EndpointSpec("vm", "update", VmUpdate, VmInfo, "Change a stopped VM's spec.")
CLONE = EndpointSpec("vm", "clone", VmClone, JobAccepted, "Clone a stopped VM (a job).")
MIGRATE = EndpointSpec(
    "vm", "migrate", VmMigrate, JobAccepted,
    "Move a stopped VM to another host: disks, definition, state (a job).")
EXPORT_STATE = EndpointSpec(
    "vm", "export_state", VmRef, VmGuestState,
    "A stopped VM's NVRAM and TPM state (for a migration).")
IMPORT_STATE = EndpointSpec(
    "vm", "import_state", VmGuestState, Ack,
    "Give a stopped VM the NVRAM and TPM state of its source (a migration).",
    max_payload=16 << 20)
ATTACH_DISK = EndpointSpec(
    "vm", "attach_disk", VmAttachDisk, VmInfo,
    "Add a disk: to the definition of a stopped VM, live and persistent to a running one.")
DETACH_DISK = EndpointSpec("vm", "detach_disk", VmDetachDisk, VmInfo,
                           "Remove a disk (its file stays).")
ATTACH_NIC = EndpointSpec("vm", "attach_nic", VmAttachNic, VmInfo,
                          "Add a NIC (live and persistent when running).")
DETACH_NIC = EndpointSpec("vm", "detach_nic", VmDetachNic, VmInfo, "Remove a NIC by MAC.")
ATTACH_USB = EndpointSpec("vm", "attach_usb", VmAttachUsb, VmInfo,
                          "Pass a host USB device through (vendor:product or bus.device).")
DETACH_USB = EndpointSpec("vm", "detach_usb", VmDetachUsb, VmInfo,
                          "Give a passed-through USB device back.")
SNAPSHOT_CREATE = EndpointSpec(
    "vm", "snapshot_create", VmSnapshotCreate, VmSnapshot,
    "Snapshot a VM: disks (reflink, else sparse copy), NVRAM, TPM state, spec.")
SNAPSHOT_LIST = EndpointSpec(
    "vm", "snapshot_list", VmSnapshotRef, VmSnapshotList, "A VM's snapshots.")
SNAPSHOT_REVERT = EndpointSpec(
    "vm", "snapshot_revert", VmSnapshotRevert, VmInfo,
    "Give a stopped VM back all of a snapshot; crash-safe.")
SNAPSHOT_DELETE = EndpointSpec(
    "vm", "snapshot_delete", VmSnapshotRef, Ack, "Delete one snapshot of a VM.")
BACKUP = EndpointSpec(
    "vm", "backup", VmBackup, JobAccepted,
    "Write a backup archive of a VM, running or not (a job).")
RESTORE = EndpointSpec(
    "vm", "restore", VmRestore, JobAccepted,
    "Define a VM from a backup archive, every sum checked first (a job).")
SCHEDULE_BACKUP = EndpointSpec(
    "vm", "schedule_backup", VmBackupSchedule, BackupScheduleList,
    "Set or remove a VM's backup schedule; answers every schedule of this host.")
BACKUP_SCHEDULES = EndpointSpec(
    "vm", "backup_schedules", Empty, BackupScheduleList, "The backup schedules of this host.")
CONSOLE = EndpointSpec(
    "vm", "console", ConsoleOpen, ConsoleSession,
    "Bridge a running VM's VNC or serial console to a session over NATS.")
EJECT = EndpointSpec("vm", "eject", VmRef, VmInfo,
                     "Empty the CD-ROM drive (live and persistent when running).")
INSERT = EndpointSpec("vm", "insert", VmInsert, VmInfo,
                      "Put an ISO in the CD-ROM drive (live and persistent when running).")
SCREENSHOT = EndpointSpec(
    "vm", "screenshot", VmScreenshotRequest, VmScreenshot,
    "A running VM's screen as a small PNG (libvirt's screenshot, shrunk).")
JOBS, JOB, CANCEL = job_endpoints("vm")

# What the vm agent serves; the job endpoints are added by the agent runtime.
ENDPOINTS = (CREATE, START, SHUTDOWN, DESTROY, REBOOT, SUSPEND, RESUME, DELETE, LIST, INFO, UPDATE,
    CLONE, MIGRATE, EXPORT_STATE, IMPORT_STATE, ATTACH_DISK, DETACH_DISK, ATTACH_NIC, DETACH_NIC,
    ATTACH_USB, DETACH_USB, EJECT, INSERT, *net_api.ENDPOINTS, SNAPSHOT_CREATE, SNAPSHOT_LIST,
    SNAPSHOT_REVERT, SNAPSHOT_DELETE, BACKUP, RESTORE, SCHEDULE_BACKUP, BACKUP_SCHEDULES, CONSOLE,
    SCREENSHOT)
