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

import ipaddress
import itertools
import xml.etree.ElementTree as ET
from typing import Literal

import msgspec

from services.vm.spec import DISK_TARGETS
from shared.errors import Conflict
from shared.messages.net import Network, NetworkMode, NetworkSpec
from shared.messages.vm import ConsoleEndpoint, Disk, Nic, UsbHostdev, VmSpec
from shared.validate import PCI_ADDRESS

METADATA_NS = "https://phyllome.dev/xmlns/vm/1"
ET.register_namespace("phyllome", METADATA_NS)

GUEST_AGENT_CHANNEL = "org.qemu.guest_agent.0"
# Free PCIe root ports a VM gets for disks and NICs attached while it runs (q35 hot-plugs
# only into a root port, and libvirt leaves at most one free).
HOTPLUG_PORTS = 4
BUILTIN_PCI = 5  # at most: video, virtio-serial, rng, balloon, USB controller


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
    ET.SubElement(dom, "metadata").append(_metadata(spec))
    _text(dom, "memory", str(spec.memory_mib), unit="MiB")
    _text(dom, "currentMemory", str(spec.memory_mib), unit="MiB")
    _text(dom, "vcpu", str(spec.vcpus), placement="static")
    _memory_backing(dom, spec)
    _os(dom, spec)
    features = ET.SubElement(dom, "features")
    ET.SubElement(features, "acpi")
    if _x86(spec):
        ET.SubElement(features, "apic")
    else:  # GICv3: more than 8 vCPUs, emulated by TCG as well
        ET.SubElement(features, "gic", version="3")
    if spec.secure_boot and _x86(spec):  # OVMF keeps its variables safe in SMM; ARM has none
        ET.SubElement(features, "smm", state="on")
    if spec.profile == "windows":
        features.append(_hyperv(accelerator))
    _cpu(dom, spec, accelerator)
    _clock(dom, spec)
    _text(dom, "on_poweroff", "destroy")
    _text(dom, "on_reboot", "restart")
    _text(dom, "on_crash", "destroy")
    if _x86(spec):  # ACPI S3/S4 (libvirt refuses the setting on virt)
        pm = ET.SubElement(dom, "pm")
        ET.SubElement(pm, "suspend-to-mem", enabled="no")
        ET.SubElement(pm, "suspend-to-disk", enabled="no")
    devices = ET.SubElement(dom, "devices")
    _devices(devices, spec, serial_log)
    _virtio_devices(devices, spec)
    _launch_security(dom, devices, spec)
    ET.indent(dom)
    return ET.tostring(dom, encoding="unicode") + "\n"


def _x86(spec: VmSpec) -> bool:
    """q35 (x86_64), else QEMU's ``virt`` machine (aarch64): no ISA, no SATA, PL011 serial."""
    return spec.arch == "x86_64"


def _stored(spec: VmSpec) -> str:
    """The spec as the metadata keeps it: without the console password, since anyone who
    may read the domain (``virsh dumpxml``) reads its metadata."""
    return msgspec.json.encode(msgspec.structs.replace(spec, password="")).decode()


def _metadata(spec: VmSpec) -> ET.Element:
    meta = ET.Element(f"{{{METADATA_NS}}}vm")
    _text(meta, f"{{{METADATA_NS}}}spec", _stored(spec))
    return meta


def metadata(spec: VmSpec) -> str:
    """The metadata element carrying ``spec``, for libvirt's ``setMetadata``, which puts the
    root element into our namespace itself (and refuses one already there): the child
    declares it on its own, so that it reads back as ``build`` writes it."""
    root = ET.Element("vm")
    _text(root, "spec", _stored(spec), xmlns=METADATA_NS)
    return ET.tostring(root, encoding="unicode")


def _cpu(dom: ET.Element, spec: VmSpec, accelerator: Literal["kvm", "tcg"]) -> None:
    """The host's CPU under KVM (or when nested); QEMU's ``max`` model under TCG, which
    has every feature TCG emulates (x86-64-v2 and more), unless the spec names a model."""
    mode = spec.cpu or ("host-passthrough" if accelerator == "kvm" or spec.nested
                        else "maximum")
    if mode in ("host-passthrough", "maximum"):
        ET.SubElement(dom, "cpu", mode=mode, check="none", migratable="on")
    elif mode == "host-model":
        ET.SubElement(dom, "cpu", mode=mode, check="partial")
    else:  # libvirt knows no host CPU to check an ARM model against ("unknown host CPU")
        cpu = ET.SubElement(dom, "cpu", mode="custom", match="exact",
                            check="partial" if _x86(spec) else "none")
        _text(cpu, "model", mode, fallback="forbid")


# Hyper-V enlightenments Windows uses (what virt-manager and Proxmox give a Windows guest);
# QEMU 7.2 under TCG takes the first three only (vpindex: "kernel doesn't allow setting
# HyperV VP_INDEX", and the rest build on it).
HYPERV = ("relaxed", "vapic", "spinlocks", "vpindex", "runtime", "synic", "stimer", "reset",
          "frequencies", "tlbflush", "ipi")
HYPERV_TCG = HYPERV[:3]


def _hyperv(accelerator: Literal["kvm", "tcg"]) -> ET.Element:
    hv = ET.Element("hyperv", mode="custom")
    for name in HYPERV if accelerator == "kvm" else HYPERV_TCG:
        el = ET.SubElement(hv, name, state="on")
        if name == "spinlocks":
            el.set("retries", "8191")
        elif name == "stimer":
            ET.SubElement(el, "direct", state="on")
    return hv


def _clock(dom: ET.Element, spec: VmSpec) -> None:
    """UTC for every guest but Windows, which keeps local time in its RTC and counts on the
    Hyper-V clock for a steady time source."""
    windows = spec.profile == "windows"
    clock = ET.SubElement(dom, "clock", offset="localtime" if windows else "utc")
    if not _x86(spec):  # the virt machine's timers are the CPU's (no RTC, PIT or HPET)
        return
    ET.SubElement(clock, "timer", name="rtc", tickpolicy="catchup")
    ET.SubElement(clock, "timer", name="pit", tickpolicy="delay")
    ET.SubElement(clock, "timer", name="hpet", present="no")
    if windows:
        ET.SubElement(clock, "timer", name="hypervclock", present="yes")


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
        if spec.cdrom is not None and spec.cdrom.path:
            ET.SubElement(os_el, "boot", dev="cdrom")  # the installer first, then its disk
        ET.SubElement(os_el, "boot", dev="hd")


def _prefix(disk: Disk) -> str:
    return "vd" if disk.bus == "virtio" else "sd"


def _disk(disk: Disk, target: str) -> ET.Element:
    d = ET.Element("disk", type="file", device="disk")
    ET.SubElement(d, "driver", name="qemu", type="raw", discard="unmap")
    ET.SubElement(d, "source", file=disk.path)
    ET.SubElement(d, "target", dev=target, bus=disk.bus)
    if disk.readonly:
        ET.SubElement(d, "readonly")
    return d


def _cdrom_bus(spec: VmSpec) -> str:
    """The install media drive's bus: SATA on q35, which every installer's own drivers
    read (Windows Setup has no virtio-scsi driver of its own); virtio-scsi on virt, which
    has no SATA controller."""
    return "sata" if _x86(spec) else "scsi"


def _cdroms(spec: VmSpec, sata_disks: int) -> list[tuple[str, str, str]]:
    """The CD-ROM drives as (path, target, bus), after the SATA disks: the install media
    drive (maybe empty), then the cloud-init seed. The seed is on virtio-scsi on every
    machine: cloud kernels (Debian's ``linux-image-cloud-amd64``) have virtio-scsi but no
    AHCI driver. The targets share one ``sd`` namespace over both buses, so they stay apart
    from the SATA disks' and from each other."""
    drives = ([(spec.cdrom.path, _cdrom_bus(spec))] if spec.cdrom is not None else []) + \
        ([(spec.seed, "scsi")] if spec.seed else [])
    return [(path, "sd" + DISK_TARGETS[sata_disks + i], bus)
            for i, (path, bus) in enumerate(drives)]


def _cdrom(path: str, target: str, bus: str = "sata", unit: int = -1) -> ET.Element:
    """A read-only SATA (q35 has no IDE) or SCSI CD-ROM drive, empty when ``path`` is ''.
    A SCSI drive gets its unit on the one virtio-scsi controller: libvirt would derive it
    from the target's letter and open a second controller past ``sdo``."""
    d = ET.Element("disk", type="file", device="cdrom")
    ET.SubElement(d, "driver", name="qemu", type="raw")
    if path:
        ET.SubElement(d, "source", file=path)
    ET.SubElement(d, "target", dev=target, bus=bus)
    ET.SubElement(d, "readonly")
    if unit >= 0:
        ET.SubElement(d, "address", type="drive", controller="0", bus="0", target="0",
                      unit=str(unit))
    return d


def _cdrom_elements(spec: VmSpec, sata_disks: int) -> list[ET.Element]:
    scsi = itertools.count()
    return [_cdrom(path, target, bus, next(scsi) if bus == "scsi" else -1)
            for path, target, bus in _cdroms(spec, sata_disks)]


def cdrom_device(spec: VmSpec) -> str:
    """The install media drive of ``spec`` alone, for a live eject or insert."""
    if spec.cdrom is None:
        raise Conflict(f"VM {spec.name} has no CD-ROM drive")
    el = _cdrom_elements(spec, sum(d.bus == "sata" for d in spec.disks))[0]
    ET.indent(el)
    return ET.tostring(el, encoding="unicode")


def _nic(nic: Nic) -> ET.Element:
    n = ET.Element("interface", type=nic.kind)
    if nic.mac:
        ET.SubElement(n, "mac", address=nic.mac)
    if nic.kind == "network":
        ET.SubElement(n, "source", network=nic.source)
    elif nic.kind == "bridge":
        ET.SubElement(n, "source", bridge=nic.source)
    ET.SubElement(n, "model", type="virtio")
    return n


def _usb(usb: UsbHostdev) -> ET.Element:
    h = ET.Element("hostdev", mode="subsystem", type="usb", managed="yes")
    source = ET.SubElement(h, "source")
    if usb.vendor:
        ET.SubElement(source, "vendor", id=f"0x{usb.vendor}")
        ET.SubElement(source, "product", id=f"0x{usb.product}")
    else:
        ET.SubElement(source, "address", bus=str(usb.bus), device=str(usb.device))
    return h


def _scsi(spec: VmSpec) -> bool:
    """Whether the VM has a virtio-scsi controller (for CD-ROMs; it takes a root port)."""
    return any(bus == "scsi" for _, _, bus in _cdroms(spec, 0))


def _devices(dev: ET.Element, spec: VmSpec, serial_log: str) -> None:
    ET.SubElement(dev, "controller", type="pci", index="0", model="pcie-root")
    ports = (sum(d.bus == "virtio" for d in spec.disks) + len(spec.nics) + len(spec.hostdevs)
             + BUILTIN_PCI + HOTPLUG_PORTS + _virtio_pci(spec)
             + _scsi(spec))
    for index in range(1, ports + 1):
        ET.SubElement(dev, "controller", type="pci", index=str(index), model="pcie-root-port")
    used = {"virtio": 0, "sata": 0}
    for disk in spec.disks:
        dev.append(_disk(disk, _prefix(disk) + DISK_TARGETS[used[disk.bus]]))
        used[disk.bus] += 1
    if _scsi(spec):
        ET.SubElement(dev, "controller", type="scsi", index="0", model="virtio-scsi")
    dev.extend(_cdrom_elements(spec, used["sata"]))
    for nic in spec.nics:
        dev.append(_nic(nic))
    serial = ET.SubElement(dev, "serial", type="pty")
    ET.SubElement(serial, "log", file=serial_log, append="off")
    if _x86(spec):
        target = ET.SubElement(serial, "target", type="isa-serial", port="0")
        ET.SubElement(target, "model", name="isa-serial")
    else:  # the virt machine's PL011 UART (the guest's ttyAMA0)
        target = ET.SubElement(serial, "target", type="system-serial", port="0")
        ET.SubElement(target, "model", name="pl011")
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
        if spec.input == "usb":
            ET.SubElement(dev, "input", type="tablet", bus="usb")
            if not _x86(spec):  # q35 has a PS/2 keyboard for the console; virt none
                ET.SubElement(dev, "input", type="keyboard", bus="usb")
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
        # CRB on q35; on virt QEMU has the TIS interface as a sysbus device (tpm-tis-device)
        tpm = ET.SubElement(dev, "tpm", model="tpm-crb" if _x86(spec) else "tpm-tis")
        ET.SubElement(tpm, "backend", type="emulator", version="2.0")
    for hd in spec.hostdevs:
        _hostdev(dev, hd)
    for usb in spec.usb_hostdevs:
        dev.append(_usb(usb))
    ET.SubElement(dev, "memballoon", model="virtio" if spec.balloon else "none")


# -- VIRTIO 1.2 devices and confidential computing ----------------------------------------

VIRTIOFSD = "/usr/lib/qemu/virtiofsd"  # Debian's qemu-system-common (QEMU 7.2, C)
# Guest policies: SEV's bits NODBG|NOKS|DOMAIN|SEV (+ ES), SNP's reserved bit 17 + SMT,
# TDX's SEPT_VE_DISABLE; debugging stays off in each.
POLICY = {"sev": "0x0033", "sev-es": "0x0037", "sev-snp": "0x00030000", "tdx": "0x10000000"}


def _virtio_pci(spec: VmSpec) -> int:
    """PCI functions the devices below take (each wants its own root port)."""
    return len(spec.shares) + spec.vsock + (2 if spec.input == "virtio" else 0)


def _memory_backing(dom: ET.Element, spec: VmSpec) -> None:
    """virtiofsd maps the guest's memory, so a VM with shares has it in a shared memfd."""
    if spec.shares:
        backing = ET.SubElement(dom, "memoryBacking")
        ET.SubElement(backing, "source", type="memfd")
        ET.SubElement(backing, "access", mode="shared")


def _virtio_devices(dev: ET.Element, spec: VmSpec) -> None:
    for share in spec.shares:
        fs = ET.SubElement(dev, "filesystem", type="mount", accessmode="passthrough")
        ET.SubElement(fs, "driver", type="virtiofs")
        ET.SubElement(fs, "binary", path=VIRTIOFSD)
        ET.SubElement(fs, "source", dir=share.source)
        ET.SubElement(fs, "target", dir=share.tag)
    if spec.vsock:
        ET.SubElement(ET.SubElement(dev, "vsock", model="virtio"), "cid", auto="yes")
    if spec.input == "virtio":
        ET.SubElement(dev, "input", type="tablet", bus="virtio")
        ET.SubElement(dev, "input", type="keyboard", bus="virtio")


def _launch_security(dom: ET.Element, dev: ET.Element, spec: VmSpec) -> None:
    """A confidential guest: ``<launchSecurity>`` with its policy (libvirt picks OVMF by
    the descriptor feature ``amd-sev``/``amd-sev-es``/``amd-sev-snp``/``intel-tdx``), and
    every virtio device behind the IOMMU (``iommu_platform``), since the host can only
    reach the pages the guest shares through it."""
    if spec.confidential == "none":
        return
    launch = ET.SubElement(dom, "launchSecurity",
                           type="sev" if spec.confidential == "sev-es" else spec.confidential)
    _text(launch, "policy", POLICY[spec.confidential])
    if spec.guest_agent or spec.display in ("spice", "both"):
        ET.SubElement(dev, "controller", type="virtio-serial", index="0")
    for el in dev:
        if el.tag in ("disk", "filesystem"):
            driver = el.find("driver")
            if driver is not None:
                driver.set("iommu", "on")
        elif el.tag in ("interface", "rng", "memballoon", "vsock", "video") \
                and el.get("model", "virtio") == "virtio" \
                or el.tag == "controller" and el.get("type") == "virtio-serial" \
                or el.tag == "input" and el.get("bus") == "virtio":
            ET.SubElement(el, "driver", iommu="on")


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


# -- one device, for a live attach or detach ------------------------------------------------


def device(item: Disk | Nic | UsbHostdev, *, live_xml: str = "") -> str:
    """The device element of ``item`` alone. A disk takes the target its path has in
    ``live_xml`` (a detach), else the first one free there (an attach)."""
    if isinstance(item, Nic):
        el = _nic(item)
    elif isinstance(item, UsbHostdev):
        el = _usb(item)
    else:
        el = _disk(item, _disk_target(item, live_xml))
    ET.indent(el)
    return ET.tostring(el, encoding="unicode")


def _disk_target(disk: Disk, live_xml: str) -> str:
    used = set()
    for d in ET.fromstring(live_xml).iterfind("devices/disk"):
        source, target = d.find("source"), d.find("target")
        dev = target.get("dev", "") if target is not None else ""
        if source is not None and source.get("file") == disk.path:
            return dev
        used.add(dev)
    free = [_prefix(disk) + t for t in DISK_TARGETS if _prefix(disk) + t not in used]
    if not free:
        raise Conflict(f"no free {disk.bus} disk target left: detach a disk first")
    return free[0]


# -- networks -------------------------------------------------------------------------------


def bridge_name(name: str) -> str:
    """The host bridge of a NAT or isolated network (``spec.check_network`` keeps it short)."""
    return f"phy-{name}"


def network(spec: NetworkSpec) -> str:
    """The libvirt network XML of a checked network spec: DHCP over the subnet but the
    host's (first) address; DNS from the same dnsmasq; NAT out for ``nat`` only."""
    net = ET.Element("network")
    _text(net, "name", spec.name)
    if spec.mode == "bridge":
        ET.SubElement(net, "forward", mode="bridge")
        ET.SubElement(net, "bridge", name=spec.bridge)
    else:
        if spec.mode == "nat":
            ET.SubElement(net, "forward", mode="nat")
        ET.SubElement(net, "bridge", name=bridge_name(spec.name), stp="on", delay="0")
        subnet = ipaddress.IPv4Network(spec.subnet)
        hosts = list(itertools.islice(subnet.hosts(), 2))
        ip = ET.SubElement(net, "ip", address=str(hosts[0]), prefix=str(subnet.prefixlen))
        ET.SubElement(ET.SubElement(ip, "dhcp"), "range", start=str(hosts[1]),
                      end=str(subnet.broadcast_address - 1))
    ET.indent(net)
    return ET.tostring(net, encoding="unicode") + "\n"


def network_of(xml: str, *, active: bool, autostart: bool) -> Network:
    """A libvirt network as Phyllome shows it (any network of the host, ours or not)."""
    root = ET.fromstring(xml)
    forward = root.find("forward")
    fwd = forward.get("mode", "nat") if forward is not None else ""
    bridge = root.find("bridge")
    subnet = ""
    ip = root.find("ip")
    if ip is not None and ip.get("address"):
        mask = ip.get("prefix") or ip.get("netmask") or "24"
        subnet = str(ipaddress.ip_interface(f"{ip.get('address')}/{mask}").network)
    mode: NetworkMode = "isolated" if not fwd else "bridge" if fwd == "bridge" else "nat"
    return Network(name=root.findtext("name", ""), mode=mode, subnet=subnet,
                   bridge=bridge.get("name", "") if bridge is not None else "",
                   active=active, autostart=autostart)


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


def vsock_cid_of(xml: str) -> int:
    """The guest CID libvirt chose for the vsock device of a running domain (0: none)."""
    cid = ET.fromstring(xml).find("devices/vsock/cid")
    return int(cid.get("address", "0")) if cid is not None else 0


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
