"""VmSpec -> libvirt domain XML, built with ElementTree, and the few facts read back from it.

Pure code: no libvirt, no files. ``check_spec`` refuses what the XML must never contain
(names with quotes or slashes, BIOS with Secure Boot, ...) before anything is defined, and
``build`` turns a checked spec into the XML the agent defines::

    >>> from shared.messages.vm import VmSpec
    >>> xml = build(VmSpec(name="demo", uuid="3f1e0c6a-5a8d-4c1e-9d0b-1c2d3e4f5a6b"),
    ...             accelerator="tcg", serial_log="/var/log/phyllome/demo.log")
    >>> xml.startswith("<domain type=\\"qemu\\">")
    True
"""

from __future__ import annotations

import ipaddress
import re
import xml.etree.ElementTree as ET
from typing import Literal

import msgspec

from shared.errors import BadRequest, InvalidName
from shared.messages.vm import ConsoleEndpoint, VmSpec
from shared.validate import PCI_ADDRESS

METADATA_NS = "https://phyllome.dev/xmlns/vm/1"
ET.register_namespace("phyllome", METADATA_NS)

MIN_MEMORY_MIB = 16
MAX_VCPUS = 255
VNC_PASSWORD_MAX = 8
GUEST_AGENT_CHANNEL = "org.qemu.guest_agent.0"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
_UUID = re.compile(r"^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")
_IFACE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")  # libvirt's deviceName, no '/'
_MAC = re.compile(r"^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$")
_DISK_TARGETS = "abcdefghijklmnopqrstuvwxyz"


def check_name(name: str) -> str:
    """``name`` if it is a safe VM name (also used in file names and on the command line)."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidName(
            f"VM name {name!r} is not valid: use 1-64 letters, digits, '-', '_', '.' or '+', "
            "starting with a letter or digit (no spaces, quotes, '<' or '/')"
        )
    return name


def check_ref(ref: str) -> str:
    """``ref`` if it can name a VM: a uuid or a valid name."""
    if isinstance(ref, str) and _UUID.match(ref):
        return ref
    return check_name(ref)


def is_pci_address(dev: str) -> bool:
    return bool(PCI_ADDRESS.match(dev))


def check_spec(spec: VmSpec) -> None:
    """Refuse a spec that no host could run, with what to change; host limits come later."""
    check_name(spec.name)
    if spec.uuid and not _UUID.match(spec.uuid):
        raise BadRequest(f"uuid {spec.uuid!r} is not a UUID (8-4-4-4-12 hex digits)")
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
    if len(spec.disks) > len(_DISK_TARGETS):
        raise BadRequest(f"{len(spec.disks)} disks: at most {len(_DISK_TARGETS)}")
    for disk in spec.disks:
        if not disk.path and not disk.volume:
            raise BadRequest("a disk needs a path or a storage volume")
    paths = [d.path for d in spec.disks if d.path or not d.volume]
    for path in paths + [p for p in (spec.kernel, spec.initrd) if p]:
        if not path.startswith("/") or "\x00" in path:
            raise BadRequest(f"path {path!r} must be absolute")
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


def build(
    spec: VmSpec,
    *,
    accelerator: Literal["kvm", "tcg"],
    serial_log: str,
) -> str:
    """The domain XML of a checked spec; the spec itself rides along in ``<metadata>``."""
    dom = ET.Element("domain", type="kvm" if accelerator == "kvm" else "qemu")
    _text(dom, "name", spec.name)
    if spec.uuid:
        _text(dom, "uuid", spec.uuid)
    meta = ET.SubElement(ET.SubElement(dom, "metadata"), f"{{{METADATA_NS}}}vm")
    stored = msgspec.structs.replace(spec, password="")  # dumpxml shows metadata to anyone
    _text(meta, f"{{{METADATA_NS}}}spec", msgspec.json.encode(stored).decode())
    _text(dom, "memory", str(spec.memory_mib), unit="MiB")
    _text(dom, "currentMemory", str(spec.memory_mib), unit="MiB")
    _text(dom, "vcpu", str(spec.vcpus), placement="static")
    _os(dom, spec)
    features = ET.SubElement(dom, "features")
    ET.SubElement(features, "acpi")
    ET.SubElement(features, "apic")
    if spec.secure_boot:
        ET.SubElement(features, "smm", state="on")
    if spec.nested:
        ET.SubElement(dom, "cpu", mode="host-passthrough", check="none", migratable="on")
    clock = ET.SubElement(dom, "clock", offset="utc")
    ET.SubElement(clock, "timer", name="rtc", tickpolicy="catchup")
    ET.SubElement(clock, "timer", name="pit", tickpolicy="delay")
    ET.SubElement(clock, "timer", name="hpet", present="no")
    _text(dom, "on_poweroff", "destroy")
    _text(dom, "on_reboot", "restart")
    _text(dom, "on_crash", "destroy")
    pm = ET.SubElement(dom, "pm")
    ET.SubElement(pm, "suspend-to-mem", enabled="no")
    ET.SubElement(pm, "suspend-to-disk", enabled="no")
    _devices(ET.SubElement(dom, "devices"), spec, serial_log)
    ET.indent(dom)
    return ET.tostring(dom, encoding="unicode") + "\n"


def _os(dom: ET.Element, spec: VmSpec) -> None:
    os_el = ET.SubElement(dom, "os")
    if spec.firmware == "uefi":
        os_el.set("firmware", "efi")
    _text(os_el, "type", "hvm", arch=spec.arch, machine=spec.machine)
    if spec.firmware == "uefi":
        fw = ET.SubElement(os_el, "firmware")
        ET.SubElement(fw, "feature", enabled="yes" if spec.secure_boot else "no",
                      name="secure-boot")
        if spec.secure_boot:
            ET.SubElement(fw, "feature", enabled="yes", name="enrolled-keys")
    if spec.kernel:
        _text(os_el, "kernel", spec.kernel)
        if spec.initrd:
            _text(os_el, "initrd", spec.initrd)
        if spec.cmdline:
            _text(os_el, "cmdline", spec.cmdline)
    else:
        ET.SubElement(os_el, "boot", dev="hd")


def _devices(dev: ET.Element, spec: VmSpec, serial_log: str) -> None:
    used = {"virtio": 0, "sata": 0}
    for disk in spec.disks:
        d = ET.SubElement(dev, "disk", type="file", device="disk")
        ET.SubElement(d, "driver", name="qemu", type="raw", discard="unmap")
        ET.SubElement(d, "source", file=disk.path)
        prefix = "vd" if disk.bus == "virtio" else "sd"
        ET.SubElement(d, "target", dev=prefix + _DISK_TARGETS[used[disk.bus]], bus=disk.bus)
        used[disk.bus] += 1
        if disk.readonly:
            ET.SubElement(d, "readonly")
    for nic in spec.nics:
        n = ET.SubElement(dev, "interface", type=nic.kind)
        if nic.mac:
            ET.SubElement(n, "mac", address=nic.mac)
        if nic.kind == "network":
            ET.SubElement(n, "source", network=nic.source)
        elif nic.kind == "bridge":
            ET.SubElement(n, "source", bridge=nic.source)
        ET.SubElement(n, "model", type="virtio")
    serial = ET.SubElement(dev, "serial", type="pty")
    ET.SubElement(serial, "log", file=serial_log, append="off")
    target = ET.SubElement(serial, "target", type="isa-serial", port="0")
    ET.SubElement(target, "model", name="isa-serial")
    console = ET.SubElement(dev, "console", type="pty")
    ET.SubElement(console, "target", type="serial", port="0")
    if spec.guest_agent:
        ch = ET.SubElement(dev, "channel", type="unix")
        ET.SubElement(ch, "target", type="virtio", name=GUEST_AGENT_CHANNEL)
    if spec.display in ("spice", "both"):
        ch = ET.SubElement(dev, "channel", type="spicevmc")
        ET.SubElement(ch, "target", type="virtio", name="com.redhat.spice.0")
    if spec.usb:
        ET.SubElement(dev, "controller", type="usb", model="qemu-xhci", ports="15")
        ET.SubElement(dev, "input", type="tablet", bus="usb")
    if spec.display in ("vnc", "both"):
        g = ET.SubElement(dev, "graphics", type="vnc", port="-1", autoport="yes")
        if spec.password:
            g.set("passwd", spec.password)
        ET.SubElement(g, "listen", type="address", address=spec.listen)
    if spec.display in ("spice", "both"):
        g = ET.SubElement(dev, "graphics", type="spice", autoport="yes")
        if spec.password:
            g.set("passwd", spec.password)
        ET.SubElement(g, "listen", type="address", address=spec.listen)
        ET.SubElement(g, "image", compression="off")
    if spec.video == "virtio":
        video = ET.SubElement(dev, "video")
        ET.SubElement(video, "model", type="virtio", heads="1", primary="yes")
    if spec.sound == "ich9":
        ET.SubElement(dev, "sound", model="ich9")
    if spec.rng:
        rng = ET.SubElement(dev, "rng", model="virtio")
        _text(rng, "backend", "/dev/urandom", model="random")
    if spec.tpm == "emulated-2.0":
        tpm = ET.SubElement(dev, "tpm", model="tpm-crb")
        ET.SubElement(tpm, "backend", type="emulator", version="2.0")
    for hd in spec.hostdevs:
        _hostdev(dev, hd)
    ET.SubElement(dev, "memballoon", model="virtio" if spec.balloon else "none")


def _hostdev(dev: ET.Element, address: str) -> None:
    m = PCI_ADDRESS.match(address)
    if m:
        h = ET.SubElement(dev, "hostdev", mode="subsystem", type="pci", managed="yes")
        domain, bus, slot, function = m.groups()
        ET.SubElement(ET.SubElement(h, "source"), "address", domain=f"0x{domain.lower()}",
                      bus=f"0x{bus.lower()}", slot=f"0x{slot.lower()}", function=f"0x{function}")
    else:
        h = ET.SubElement(dev, "hostdev", mode="subsystem", type="mdev", model="vfio-pci")
        ET.SubElement(ET.SubElement(h, "source"), "address", uuid=address.lower())


def _text(parent: ET.Element, tag: str, text: str, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, attrs)
    el.text = text
    return el


# -- reading back what libvirt filled in ---------------------------------------------------


def spec_of(xml: str) -> VmSpec | None:
    """The spec the agent stored in a domain's metadata, or None for a domain it did not make.

    The password comes back from the graphics element when ``xml`` was read with secrets.
    """
    root = ET.fromstring(xml)
    el = root.find(f"metadata/{{{METADATA_NS}}}vm/{{{METADATA_NS}}}spec")
    if el is None or not el.text:
        return None
    try:
        spec = msgspec.json.decode(el.text, type=VmSpec)
    except msgspec.MsgspecError:
        return None
    graphics = root.find("devices/graphics[@passwd]")
    if graphics is not None:
        spec = msgspec.structs.replace(spec, password=graphics.get("passwd", ""))
    return spec


def macs_of(xml: str) -> list[str]:
    """The MAC addresses libvirt gave the NICs, in order."""
    return [m.get("address", "") for m in ET.fromstring(xml).iterfind("devices/interface/mac")]


def nvram_of(xml: str) -> str:
    """The NVRAM file libvirt chose for a UEFI domain ('' for BIOS)."""
    el = ET.fromstring(xml).find("os/nvram")
    return el.text or "" if el is not None else ""


def consoles_of(xml: str) -> dict[str, ConsoleEndpoint]:
    """VNC / SPICE endpoints of a running domain's live XML (ports are known once started)."""
    out: dict[str, ConsoleEndpoint] = {}
    for g in ET.fromstring(xml).iterfind("devices/graphics"):
        kind = g.get("type", "")
        port = int(g.get("port", "-1"))
        if kind not in ("vnc", "spice") or port <= 0:
            continue
        listen = g.find("listen")
        host = (listen.get("address") if listen is not None else None) or g.get("listen", "")
        host = host or "127.0.0.1"
        shown = f"[{host}]" if ":" in host else host
        out[kind] = ConsoleEndpoint(host=host, port=port, uri=f"{kind}://{shown}:{port}")
    return out
