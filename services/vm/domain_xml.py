"""VmSpec -> libvirt domain XML, built with ElementTree, and the few facts read back from it.

Pure code: no libvirt, no files; only the libvirt backend uses it. ``build`` turns a spec
that ``spec.check_spec`` let through into the XML the backend defines::

    >>> from shared.messages.vm import VmSpec
    >>> xml = build(VmSpec(name="demo", uuid="3f1e0c6a-5a8d-4c1e-9d0b-1c2d3e4f5a6b"),
    ...             accelerator="tcg", serial_log="/var/log/phyllome/demo.log")
    >>> xml.startswith("<domain type=\\"qemu\\">")
    True
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Literal

import msgspec

from services.vm.spec import DISK_TARGETS
from shared.messages.vm import ConsoleEndpoint, VmSpec
from shared.validate import PCI_ADDRESS

METADATA_NS = "https://phyllome.dev/xmlns/vm/1"
ET.register_namespace("phyllome", METADATA_NS)

GUEST_AGENT_CHANNEL = "org.qemu.guest_agent.0"


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
        ET.SubElement(d, "target", dev=prefix + DISK_TARGETS[used[disk.bus]], bus=disk.bus)
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


def serial_pty_of(xml: str) -> str:
    """The pty of a running domain's first serial port ('' when it has none yet)."""
    source = ET.fromstring(xml).find("devices/serial[@type='pty']/source")
    return source.get("path", "") if source is not None else ""
