"""What a ``VmSpec`` may hold, checked before any hypervisor sees it.

Names and uuids end up in file names and on command lines, paths must be absolute, and a
spec no host could run (Secure Boot on BIOS, a VNC password over 8 characters, ...) is
refused with what to change, before any disk is made or anything defined::

    >>> check_spec(VmSpec(name="demo", memory_mib=8))
    Traceback (most recent call last):
    shared.errors.BadRequest: memory of 8 MiB is too small: give at least 16 MiB
"""

from __future__ import annotations

import ipaddress
import re
import secrets

import msgspec

from services.vm import cloudinit
from shared import archs
from shared.errors import BadRequest, Conflict, InvalidName
from shared.messages.net import NetworkSpec
from shared.messages.vm import Disk, Share, UsbHostdev, VmSpec
from shared.validate import PCI_ADDRESS

MIN_MEMORY_MIB = 16
MAX_VCPUS = 255
VNC_PASSWORD_MAX = 8

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
_UUID = re.compile(r"^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")
_IFACE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")  # libvirt's deviceName, no '/'
_MAC = re.compile(r"^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$")
DISK_TARGETS = "abcdefghijklmnopqrstuvwxyz"
CPU_MODES = ("host-passthrough", "maximum", "host-model")  # else a named model
_CPU_MODEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_USB_ID = re.compile(r"^[0-9a-f]{4}$")
# Network names become host bridge names (``phy-<name>``, at most 15 characters).
# A virtio-fs tag: the guest's ``mount -t virtiofs TAG`` (QEMU allows 36 bytes).
_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,35}$")
_NETWORK = re.compile(r"^[a-z][a-z0-9-]{0,10}$")
_BRIDGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$")
MIN_PREFIX, MAX_PREFIX = 8, 29  # a /30 leaves no address for DHCP beside the host's


def check_name(name: str) -> str:
    """``name`` if it is a safe VM name (also used in file names and on the command line)."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidName(
            f"VM name {name!r} is not valid: use 1-64 letters, digits, '-', '_', '.' or '+', "
            "starting with a letter or digit (no spaces, quotes, '<' or '/')"
        )
    return name


def check_uuid(uuid: str) -> str:
    """``uuid`` if it is a UUID as libvirt spells them (also used in file names)."""
    if not isinstance(uuid, str) or not _UUID.match(uuid):
        raise InvalidName(f"uuid {uuid!r} is not a UUID (8-4-4-4-12 hex digits)")
    return uuid


def check_ref(ref: str) -> str:
    """``ref`` if it can name a VM: a uuid or a valid name."""
    if isinstance(ref, str) and _UUID.match(ref):
        return ref
    return check_name(ref)


def random_mac() -> str:
    """A MAC in QEMU's locally administered range 52:54:00."""
    return "52:54:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))


def is_pci_address(dev: str) -> bool:
    return bool(PCI_ADDRESS.match(dev))


def with_machine(spec: VmSpec) -> VmSpec:
    """``spec`` with its arch's machine when it kept the default one (q35) for another arch:
    ``--arch aarch64`` alone gives the ``virt`` machine."""
    machine = archs.MACHINE.get(spec.arch, spec.machine)
    if spec.machine == "q35" and machine != "q35":
        return msgspec.structs.replace(spec, machine=machine)
    return spec


def check_arch(spec: VmSpec) -> None:
    """What a guest of another arch than x86_64 cannot have on its machine (``virt``)."""
    machine = archs.MACHINE[spec.arch]
    if spec.machine != machine:
        raise BadRequest(f"machine {spec.machine} is not for {spec.arch} guests: use "
                         f"--machine {machine} (or leave it out)")
    if spec.arch == "x86_64":
        return
    why = ""
    if spec.firmware != "uefi":
        why = (f"{spec.arch} guests boot UEFI ({archs.FIRMWARE_NAME[spec.arch]}): drop "
               "--firmware bios")
    elif any(d.bus == "sata" for d in spec.disks):
        why = f"the {machine} machine has no SATA: put the disks on virtio"
    elif spec.sound != "none":
        why = f"sound {spec.sound} is the q35 chipset's: drop --sound"
    elif spec.profile == "windows":
        why = "the windows profile (Hyper-V enlightenments) is for x86_64 guests"
    elif spec.confidential != "none":
        why = f"--confidential {spec.confidential} is an x86_64 (AMD, Intel) technology"
    if why:
        raise BadRequest(f"{spec.arch} guest {spec.name}: {why}")


def check_spec(spec: VmSpec) -> None:
    """Refuse a spec that no host could run, with what to change; host limits come later."""
    check_name(spec.name)
    check_arch(spec)
    if spec.uuid:
        check_uuid(spec.uuid)
    if spec.memory_mib < MIN_MEMORY_MIB:
        raise BadRequest(
            f"memory of {spec.memory_mib} MiB is too small: give at least {MIN_MEMORY_MIB} MiB"
        )
    if not 1 <= spec.vcpus <= MAX_VCPUS:
        raise BadRequest(f"{spec.vcpus} vCPUs: give between 1 and {MAX_VCPUS}")
    if spec.secure_boot and spec.firmware != "uefi":
        raise BadRequest(
            "Secure Boot needs UEFI firmware: drop --secure-boot or use --firmware uefi"
        )
    if spec.display in ("vnc", "both") and len(spec.password) > VNC_PASSWORD_MAX:
        raise BadRequest(f"a VNC password has at most {VNC_PASSWORD_MAX} characters")
    try:
        ipaddress.ip_address(spec.listen)
    except ValueError:
        raise BadRequest(f"listen address {spec.listen!r} is not an IP address") from None
    for what, text in (("cmdline", spec.cmdline), ("password", spec.password)):
        if not text.isprintable():
            raise BadRequest(f"the {what} has control or unprintable characters")
    if spec.initrd and not spec.kernel or spec.cmdline and not spec.kernel:
        raise BadRequest("initrd and cmdline need a kernel (direct kernel boot)")
    if len(spec.disks) > len(DISK_TARGETS):
        raise BadRequest(f"{len(spec.disks)} disks: at most {len(DISK_TARGETS)}")
    for disk in spec.disks:
        check_disk(disk)
    for path in (p for p in (spec.kernel, spec.initrd) if p):
        _check_path(path)
    for nic in spec.nics:
        if nic.mac and not _MAC.match(nic.mac):
            raise BadRequest(f"MAC address {nic.mac!r} is not six hex pairs (52:54:00:12:34:56)")
        if nic.kind != "user" and not _IFACE.match(nic.source):
            raise InvalidName(f"{nic.kind} name {nic.source!r} is not valid")
    for dev in spec.hostdevs:
        if not (PCI_ADDRESS.match(dev) or _UUID.match(dev)):
            raise BadRequest(
                f"host device {dev!r} is neither a PCI address (0000:01:00.0) nor an mdev UUID"
            )
    if spec.cpu and not _CPU_MODEL.match(spec.cpu):
        raise BadRequest(f"CPU model {spec.cpu!r} is not valid: use one of "
                         f"{', '.join(CPU_MODES)} or a model name such as Nehalem")
    if spec.nested and spec.cpu not in ("", "host-passthrough"):
        raise BadRequest(f"--nested gives the guest the host's CPU: drop --cpu {spec.cpu}")
    for usb in spec.usb_hostdevs:
        check_usb(usb)
    _check_media(spec)
    if spec.usb_hostdevs and not spec.usb:
        raise BadRequest("USB passthrough needs the VM's USB controller (usb: true)")
    check_shares(spec.shares)
    check_confidential(spec)


def check_shares(shares: list[Share]) -> list[Share]:
    """Shares with sane tags, each tag once; whether the directory exists is the host's."""
    seen: set[str] = set()
    for share in shares:
        _check_path(share.source)
        if not _TAG.match(share.tag):
            raise BadRequest(f"share tag {share.tag!r} is not valid: use 1-36 letters, digits, "
                             "'-', '_' or '.', starting with a letter or digit")
        if share.tag in seen:
            raise Conflict(f"VM already has a share tagged {share.tag!r}: pick another tag")
        seen.add(share.tag)
        if share.readonly:
            raise BadRequest(
                f"share {share.tag}: QEMU 7.2's virtiofsd cannot export read-only; drop "
                "--readonly and share a read-only bind mount (mount --bind -o ro) instead")
    return shares


def check_confidential(spec: VmSpec) -> None:
    """What a confidential guest cannot have, whatever the host (the host's part comes at
    create: its CPU, KVM module and firmware)."""
    mode = spec.confidential
    if mode == "none":
        return
    if spec.firmware != "uefi":
        raise BadRequest(f"--confidential {mode} boots OVMF: use --firmware uefi")
    if spec.secure_boot and mode != "sev":
        raise BadRequest(f"--confidential {mode} needs firmware without SMM, which cannot "
                         "keep Secure Boot's variables safe: drop --secure-boot")
    if spec.accelerator == "tcg":
        raise BadRequest(f"--confidential {mode} needs the CPU's memory encryption under "
                         "KVM: use --accelerator kvm or auto")
    if spec.hostdevs or spec.usb_hostdevs:
        raise BadRequest(f"--confidential {mode}: a passed-through device could read the "
                         "guest's memory by DMA; drop --hostdev and USB passthrough")
    if spec.nested:
        raise BadRequest(f"--confidential {mode} guests cannot run nested VMs: drop --nested")


def _check_media(spec: VmSpec) -> None:
    """CD-ROMs (install media, cloud-init seed) and what the seed holds."""
    for path in (p for p in (spec.cdrom.path if spec.cdrom else "", spec.seed) if p):
        _check_path(path)
    drives = sum(d.bus == "sata" for d in spec.disks) + (spec.cdrom is not None) + bool(spec.seed)
    if drives > len(DISK_TARGETS):
        raise BadRequest(f"{drives} SATA disks and CD-ROMs: at most {len(DISK_TARGETS)}")
    if spec.cloud_init is not None:
        cloudinit.check(spec.cloud_init)


def check_disk(disk: Disk) -> Disk:
    if not disk.path and not disk.volume:
        raise BadRequest("a disk needs a path or a storage volume")
    if disk.path or not disk.volume:
        _check_path(disk.path)
    return disk


def _check_path(path: str) -> None:
    if not path.startswith("/") or "\x00" in path:
        raise BadRequest(f"path {path!r} must be absolute")


def check_usb(usb: UsbHostdev) -> UsbHostdev:
    if usb.vendor or usb.product:
        if not (_USB_ID.match(usb.vendor) and _USB_ID.match(usb.product)) or usb.bus \
                or usb.device:
            raise BadRequest(f"USB device {usb.vendor}:{usb.product}: vendor and product are "
                             "4 lower-case hex digits each (046d:c52b), without bus.device")
    elif not (1 <= usb.bus <= 255 and 1 <= usb.device <= 127):
        raise BadRequest(f"USB device {usb.bus}.{usb.device}: bus is 1-255 and device 1-127")
    return usb


def check_network(spec: NetworkSpec) -> ipaddress.IPv4Network | None:
    """The subnet of a network spec that could exist on some host (collisions come later)."""
    if not isinstance(spec.name, str) or not _NETWORK.match(spec.name):
        raise InvalidName(f"network name {spec.name!r} is not valid: use 1-11 lower-case "
                          "letters, digits or '-', starting with a letter")
    if spec.mode == "bridge":
        if not _BRIDGE.match(spec.bridge):
            raise BadRequest(f"bridge {spec.bridge!r} is not a host interface name: give the "
                             "host bridge with --bridge (br0)")
        if spec.subnet:
            raise BadRequest("a bridged network takes its addresses from the LAN: drop the "
                             "subnet")
        return None
    if spec.bridge:
        raise BadRequest(f"a {spec.mode} network makes its own bridge: drop --bridge")
    try:
        net = ipaddress.ip_network(spec.subnet, strict=False)
    except ValueError:
        raise BadRequest(f"subnet {spec.subnet!r} is not an IPv4 network: give one such as "
                         "10.77.0.0/24") from None
    if not isinstance(net, ipaddress.IPv4Network):
        raise BadRequest(f"subnet {spec.subnet}: only IPv4 subnets, such as 10.77.0.0/24")
    if "/" not in spec.subnet:
        raise BadRequest(f"subnet {spec.subnet} has no prefix length: give one such as "
                         f"{spec.subnet}/24")
    if str(net) != spec.subnet.strip():
        raise BadRequest(f"subnet {spec.subnet} has host bits set: give {net}")
    if not MIN_PREFIX <= net.prefixlen <= MAX_PREFIX:
        raise BadRequest(f"subnet {net}: give a prefix between /{MIN_PREFIX} and /{MAX_PREFIX}")
    if not net.is_private:
        raise BadRequest(f"subnet {net} is not a private range: use 10.0.0.0/8, "
                         "172.16.0.0/12 or 192.168.0.0/16")
    return net
