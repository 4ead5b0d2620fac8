"""Domain XML from VmSpecs: golden files, libvirt's schema, and names refused at the edge.

Regenerate the golden files after an intended change::

    PHYLLOME_REGENERATE=1 .venv/bin/pytest tests/unit/test_vm_domain_xml.py
"""

from __future__ import annotations

import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Literal

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.vm import domain_xml
from services.vm import spec as spec_rules
from shared import archs
from shared.errors import BadRequest, InvalidName
from shared.messages.net import NetworkSpec
from shared.messages.vm import Cdrom, CloudInit, Disk, Nic, Share, UsbHostdev, VmSpec
from tests.support.golden import regenerating
from tests.support.require import require

GOLDEN = Path(__file__).parents[1] / "data" / "vm" / "golden"
UUID = "3f1e0c6a-5a8d-4c1e-9d0b-1c2d3e4f5a6b"
MDEV = "b1a2c3d4-0000-4000-8000-000000000001"

SPECS: dict[str, tuple[VmSpec, Literal["kvm", "tcg"]]] = {
    "minimal-uefi": (VmSpec(name="minimal", uuid=UUID), "tcg"),
    "secure-boot-tpm-both": (
        VmSpec(
            name="demo", uuid=UUID, vcpus=1, memory_mib=256, secure_boot=True,
            tpm="emulated-2.0", display="both", disks=[Disk(path="/var/lib/phyllome/demo.raw")],
            nics=[Nic(kind="network", source="default", mac="52:54:00:12:34:56")],
        ),
        "tcg",
    ),
    "bios-direct-kernel": (
        VmSpec(
            name="tiny", uuid=UUID, firmware="bios", memory_mib=128, display="none",
            kernel="/var/tmp/tiny/vmlinuz", initrd="/var/tmp/tiny/initrd.gz",
            cmdline='console=ttyS0 phyllome.stay=1 quote="x"', nics=[Nic(kind="user")],
            video="none", usb=False, rng=False, balloon=False, guest_agent=False,
        ),
        "tcg",
    ),
    "kvm-nested-passthrough": (
        VmSpec(
            name="gpu-box", uuid=UUID, vcpus=8, memory_mib=8192, nested=True, sound="ich9",
            display="vnc", password="secret", hostdevs=["0000:01:00.0", MDEV],
            disks=[Disk(path="/pool/a.raw"), Disk(path="/pool/b.raw", bus="sata", readonly=True)],
            nics=[Nic(kind="bridge", source="br0")],
        ),
        "kvm",
    ),
    "usb-passthrough-named-cpu": (
        VmSpec(
            name="usb-box", uuid=UUID, cpu="Nehalem", display="none",
            usb_hostdevs=[UsbHostdev(vendor="046d", product="c52b"), UsbHostdev(bus=1, device=4)],
        ),
        "tcg",
    ),
    # VIRTIO 1.2 devices and confidential computing
    "virtio-fs-vsock-input": (
        VmSpec(name="devs", uuid=UUID, vsock=True, input="virtio",
               shares=[Share(source="/srv/data", tag="data"), Share(source="/srv/b", tag="b")]),
        "tcg",
    ),
    **{f"confidential-{mode}": (
        VmSpec(name="cc", uuid=UUID, confidential=mode, vsock=True, display="spice",
               disks=[Disk(path="/pool/cc.raw")], nics=[Nic(mac="52:54:00:12:34:56")],
               shares=[Share(source="/srv/data", tag="data")]),
        "kvm",
    ) for mode in ("sev", "sev-es", "sev-snp", "tdx")},
    "install-media-and-cloud-init": (
        VmSpec(
            name="inst", uuid=UUID, display="none",
            disks=[Disk(path="/pool/inst.raw"), Disk(path="/pool/data.raw", bus="sata")],
            cdrom=Cdrom(path="/srv/iso/installer.iso"),
            cloud_init=CloudInit(instance_id="iid-1", hostname="inst"),
            seed=f"/var/lib/phyllome/vm/disks/{UUID}-h1-cidata.iso",
        ),
        "tcg",
    ),
    "empty-cdrom-drive": (VmSpec(name="ejected", uuid=UUID, cdrom=Cdrom()), "tcg"),
    "windows-profile-kvm": (
        VmSpec(name="win-kvm", uuid=UUID, secure_boot=True, tpm="emulated-2.0",
               profile="windows", display="none"),
        "kvm",
    ),
    "windows-profile": (
        VmSpec(
            name="win11", uuid=UUID, memory_mib=4096, secure_boot=True, tpm="emulated-2.0",
            profile="windows", disks=[Disk(path="/pool/win11.raw")],
            cdrom=Cdrom(path="/srv/iso/win11.iso"),
        ),
        "tcg",
    ),
    # aarch64 on QEMU's virt machine: AAVMF (Secure Boot without SMM), PL011 serial, a TIS
    # TPM (tpm-tis-device), a USB keyboard for the console, CD-ROMs on virtio-scsi
    "aarch64-secure-boot-tpm": (
        VmSpec(name="arm", uuid=UUID, arch="aarch64", machine="virt", memory_mib=512,
               secure_boot=True, tpm="emulated-2.0", disks=[Disk(path="/pool/arm.raw")],
               nics=[Nic(kind="network", source="default", mac="52:54:00:12:34:56")]),
        "tcg",
    ),
    "aarch64-direct-kernel-media": (
        VmSpec(name="arm-inst", uuid=UUID, arch="aarch64", machine="virt", vcpus=12,
               cpu="cortex-a57",
               kernel="/var/tmp/tiny/vmlinuz", initrd="/var/tmp/tiny/initrd.gz",
               cmdline="console=ttyAMA0 phyllome.stay=1", input="virtio", display="both",
               cdrom=Cdrom(path="/srv/iso/arm.iso"),
               cloud_init=CloudInit(instance_id="iid-1", hostname="arm-inst"),
               seed=f"/var/lib/phyllome/vm/disks/{UUID}-h1-cidata.iso"),
        "tcg",
    ),
}
# libvirt 9.0's schema (Debian 12) predates these launchSecurity types: validated without.
NEWER_LAUNCH_SECURITY = {"confidential-sev-snp", "confidential-tdx"}


def _xml(case: str) -> str:
    spec, accel = SPECS[case]
    return domain_xml.build(spec, accelerator=accel, serial_log=f"/var/log/phyllome/{case}.log")


@pytest.mark.unit
@pytest.mark.parametrize("case", sorted(SPECS))
def test_vm_xml_matches_golden(case: str) -> None:
    golden = GOLDEN / f"{case}.xml"
    xml = _xml(case)
    if regenerating():
        golden.write_text(xml)
    assert golden.exists(), f"no golden file {golden}: run with PHYLLOME_REGENERATE=1"
    assert xml == golden.read_text()


@pytest.mark.integration
@pytest.mark.parametrize("case", sorted(SPECS))
def test_vm_xml_passes_virt_xml_validate(case: str, tmp_path: Path) -> None:
    tool = shutil.which("virt-xml-validate")
    require(tool is not None, "virt-xml-validate (package libvirt-clients)")
    path = tmp_path / f"{case}.xml"
    xml = _xml(case)
    if case in NEWER_LAUNCH_SECURITY and not _schema_knows(case.removeprefix("confidential-")):
        xml = re.sub(r"<launchSecurity .*</launchSecurity>\n", "", xml, flags=re.S)
    path.write_text(xml)
    done = subprocess.run([str(tool), str(path), "domain"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _schema_knows(launch_type: str) -> bool:
    schema = Path("/usr/share/libvirt/schemas/domaincommon.rng")
    return f"<value>{launch_type}</value>" in schema.read_text()


@pytest.mark.unit
def test_vm_spec_round_trips_through_metadata() -> None:
    spec, _ = SPECS["kvm-nested-passthrough"]
    xml = _xml("kvm-nested-passthrough")
    assert domain_xml.spec_of(xml) == spec
    assert domain_xml.spec_of("<domain><name>foreign</name></domain>") is None


@pytest.mark.unit
def test_vm_password_is_not_in_metadata() -> None:
    xml = _xml("kvm-nested-passthrough")
    assert xml.count("secret") == 1  # the graphics passwd attribute only


@pytest.mark.unit
@pytest.mark.parametrize(
    "name", ['it"s', "it's", "a<b", "a/b", "two words", "x" * 200, "", "-lead", "a>b"]
)
def test_vm_bad_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidName, match="VM name"):
        spec_rules.check_spec(VmSpec(name=name))


@pytest.mark.unit
@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"memory_mib": 0}, "at least 16 MiB"),
        ({"vcpus": 0}, "between 1 and"),
        ({"firmware": "bios", "secure_boot": True}, "Secure Boot needs UEFI"),
        ({"password": "longer-than-8"}, "at most 8"),
        ({"listen": "localhost; rm"}, "not an IP address"),
        ({"cmdline": "console=ttyS0"}, "need a kernel"),
        ({"kernel": "/k", "cmdline": "a\x00b"}, "unprintable"),
        ({"disks": [Disk(path="relative.raw")]}, "must be absolute"),
        ({"hostdevs": ["01:00"]}, "neither a PCI address"),
        ({"nics": [Nic(mac="zz")]}, "not six hex pairs"),
        ({"uuid": "nope"}, "not a UUID"),
        ({"cpu": "two words"}, "CPU model 'two words' is not valid"),
        ({"cpu": "Nehalem", "nested": True}, "drop --cpu Nehalem"),
        ({"usb_hostdevs": [UsbHostdev(vendor="46d", product="c52b")]}, "4 lower-case hex"),
        ({"usb_hostdevs": [UsbHostdev(vendor="046d", product="c52b", bus=1)]}, "without bus"),
        ({"usb_hostdevs": [UsbHostdev(bus=0, device=4)]}, "bus is 1-255"),
        ({"usb_hostdevs": [UsbHostdev(bus=1, device=4)], "usb": False}, "USB controller"),
        ({"arch": "aarch64"}, "machine q35 is not for aarch64 guests: use --machine virt"),
        ({"machine": "virt"}, "machine virt is not for x86_64 guests: use --machine q35"),
        ({"arch": "aarch64", "machine": "virt", "firmware": "bios"}, "boot UEFI \\(AAVMF\\)"),
        ({"arch": "aarch64", "machine": "virt", "disks": [Disk(path="/a.raw", bus="sata")]},
         "virt machine has no SATA"),
        ({"arch": "aarch64", "machine": "virt", "sound": "ich9"}, "q35 chipset's"),
        ({"arch": "aarch64", "machine": "virt", "profile": "windows"}, "for x86_64 guests"),
        ({"arch": "aarch64", "machine": "virt", "confidential": "sev"}, "x86_64 \\(AMD"),
    ],
)
def test_vm_bad_specs_are_refused(changes: dict[str, object], match: str) -> None:
    spec = VmSpec(name="ok", **changes)  # type: ignore[arg-type]
    with pytest.raises(BadRequest, match=match):
        spec_rules.check_spec(spec)


@pytest.mark.unit
def test_vm_cpu_is_the_hosts_under_kvm_and_qemus_maximum_under_tcg() -> None:
    """TCG's default qemu64 lacks x86-64-v2 (RHEL 9 and recent Fedora refuse to boot)."""
    plain = VmSpec(name="c", uuid=UUID)
    for accel, want in (("tcg", '<cpu mode="maximum"'), ("kvm", '<cpu mode="host-passthrough"')):
        assert want in domain_xml.build(plain, accelerator=accel, serial_log="/l")  # type: ignore[arg-type]
    named = domain_xml.build(msgspec.structs.replace(plain, cpu="Nehalem"), accelerator="kvm",
                             serial_log="/l")
    assert '<model fallback="forbid">Nehalem</model>' in named


@pytest.mark.unit
@pytest.mark.parametrize(("usb", "match"), [
    (UsbHostdev(vendor="046D", product="c52b"), "4 lower-case hex"),
    (UsbHostdev(vendor="046d"), "4 lower-case hex"),
    (UsbHostdev(bus=1), "device 1-127"), (UsbHostdev(bus=256, device=1), "bus is 1-255"),
])
def test_vm_bad_usb_devices_are_refused(usb: UsbHostdev, match: str) -> None:
    with pytest.raises(BadRequest, match=match):
        spec_rules.check_usb(usb)


@pytest.mark.unit
def test_vm_a_live_disk_takes_the_first_free_target_and_a_detach_its_own() -> None:
    live = _xml("kvm-nested-passthrough")  # vda (virtio) and sda (sata)
    new = domain_xml.device(Disk(path="/pool/c.raw"), live_xml=live)
    assert '<target dev="vdb" bus="virtio" />' in new
    old = domain_xml.device(Disk(path="/pool/b.raw", bus="sata"), live_xml=live)
    assert '<target dev="sda" bus="sata" />' in old
    nic = domain_xml.device(Nic(source="lab", mac="52:54:00:00:00:09"))
    assert nic.startswith('<interface type="network">') and 'network="lab"' in nic


@pytest.mark.unit
def test_vm_seed_is_on_virtio_scsi_and_the_install_medium_on_sata() -> None:
    """A cloud kernel (no AHCI driver) sees its seed; an installer without virtio drivers
    (Windows Setup) still sees its medium; every sd target is used once."""
    spec = SPECS["install-media-and-cloud-init"][0]  # vda, sda (sata), medium, seed
    dom = ET.fromstring(_xml("install-media-and-cloud-init"))
    assert [c.get("model") for c in dom.iterfind("devices/controller[@type='scsi']")] \
        == ["virtio-scsi"]
    drives = {d.get("file"): (t.get("dev"), t.get("bus"))
              for d, t in zip(dom.iterfind("devices/disk/source"),
                              dom.iterfind("devices/disk/target"), strict=True)}
    assert drives == {"/pool/inst.raw": ("vda", "virtio"), "/pool/data.raw": ("sda", "sata"),
                      "/srv/iso/installer.iso": ("sdb", "sata"),
                      spec.seed: ("sdc", "scsi")}
    # eject/insert rewrites the SATA medium drive, never the seed
    medium = domain_xml.cdrom_device(spec)
    assert '<target dev="sdb" bus="sata" />' in medium and "installer.iso" in medium
    # a disk attached while it runs takes a target neither CD-ROM has
    live = _xml("install-media-and-cloud-init")
    added = domain_xml.device(Disk(path="/pool/more.raw", bus="sata"), live_xml=live)
    assert '<target dev="sdd" bus="sata" />' in added
    # the controller has its root port: one more than the same VM without a seed
    bare = domain_xml.build(msgspec.structs.replace(spec, seed="", cloud_init=None),
                            accelerator="tcg", serial_log="/l")
    ports = "devices/controller[@model='pcie-root-port']"
    assert len(dom.findall(ports)) == len(ET.fromstring(bare).findall(ports)) + 1
    assert ET.fromstring(bare).find("devices/controller[@type='scsi']") is None


@pytest.mark.unit
@pytest.mark.parametrize(("spec", "error", "match"), [
    (NetworkSpec(name="Lab", subnet="10.1.0.0/24"), InvalidName, "network name 'Lab'"),
    (NetworkSpec(name="a-very-long-name", subnet="10.1.0.0/24"), InvalidName, "1-11"),
    (NetworkSpec(name="lab", subnet="10.1.0.0"), BadRequest, "no prefix length"),
    (NetworkSpec(name="lab", subnet="10.1.0.0/30"), BadRequest, "between /8 and /29"),
    (NetworkSpec(name="lab", subnet="10.1.0.5/24"), BadRequest, "host bits set: give 10.1.0.0/24"),
    (NetworkSpec(name="lab", subnet="fd00::/64"), BadRequest, "only IPv4"),
    (NetworkSpec(name="lab", subnet="lan"), BadRequest, "not an IPv4 network"),
    (NetworkSpec(name="lab", subnet="8.8.8.0/24"), BadRequest, "not a private range"),
    (NetworkSpec(name="lab", subnet="10.1.0.0/24", bridge="br0"), BadRequest, "drop --bridge"),
    (NetworkSpec(name="lab", mode="bridge"), BadRequest, "give the host bridge"),
    (NetworkSpec(name="lab", mode="bridge", bridge="br0", subnet="10.1.0.0/24"), BadRequest,
     "drop the subnet"),
])
def test_vm_bad_networks_are_refused(spec: NetworkSpec, error: type[Exception],
                                     match: str) -> None:
    with pytest.raises(error, match=match):
        spec_rules.check_network(spec)


@pytest.mark.integration
@pytest.mark.parametrize("spec", [
    NetworkSpec(name="phyllome", subnet="10.89.0.0/24"),
    NetworkSpec(name="lab", mode="isolated", subnet="172.20.0.0/16"),
    NetworkSpec(name="lan", mode="bridge", bridge="br0"),
])
def test_vm_network_xml_passes_virt_xml_validate_and_reads_back(spec: NetworkSpec,
                                                                tmp_path: Path) -> None:
    tool = shutil.which("virt-xml-validate")
    require(tool is not None, "virt-xml-validate (package libvirt-clients)")
    spec_rules.check_network(spec)
    xml = domain_xml.network(spec)
    path = tmp_path / "network.xml"
    path.write_text(xml)
    done = subprocess.run([str(tool), str(path), "network"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    net = domain_xml.network_of(xml, active=True, autostart=True)
    assert (net.name, net.mode, net.subnet) == (spec.name, spec.mode, spec.subnet)
    assert net.bridge == (spec.bridge or f"phy-{spec.name}")


@pytest.mark.unit
def test_vm_console_endpoints_from_live_xml() -> None:
    live = _xml("secure-boot-tpm-both").replace(
        'type="vnc" port="-1"', 'type="vnc" port="5900"'
    ).replace('type="spice" autoport="yes"', 'type="spice" port="5901" autoport="yes"')
    consoles = domain_xml.consoles_of(live)
    assert consoles["vnc"].uri == "vnc://127.0.0.1:5900"
    assert consoles["spice"].port == 5901
    assert domain_xml.consoles_of(_xml("secure-boot-tpm-both")) == {}


_names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,20}", fullmatch=True)
_paths = st.from_regex(r"/[a-z0-9_]{1,8}(/[a-z0-9_.-]{1,8}){0,2}", fullmatch=True)
_disks = st.builds(Disk, path=_paths, bus=st.sampled_from(["virtio", "sata"]),
                   readonly=st.booleans())
_nics = st.one_of(
    st.builds(Nic, kind=st.just("user")),
    st.builds(Nic, kind=st.sampled_from(["network", "bridge"]), source=_names,
              mac=st.from_regex(r"52:54:00(:[0-9a-f]{2}){3}", fullmatch=True)),
)
_hostdevs = st.one_of(
    st.from_regex(r"0000:0[0-9]:[01][0-9a-f]\.[0-7]", fullmatch=True),
    st.uuids().map(str),
)
_usb = st.one_of(
    st.builds(UsbHostdev, vendor=st.from_regex(r"[0-9a-f]{4}", fullmatch=True),
              product=st.from_regex(r"[0-9a-f]{4}", fullmatch=True)),
    st.builds(UsbHostdev, bus=st.integers(1, 255), device=st.integers(1, 127)),
)


@st.composite
def _specs(draw: st.DrawFn) -> tuple[VmSpec, str]:
    firmware = draw(st.sampled_from(["uefi", "bios"]))
    kernel = draw(st.one_of(st.just(""), _paths))
    arch = draw(st.sampled_from(["x86_64", "aarch64"]))
    spec = VmSpec(
        arch=arch, machine=archs.MACHINE[arch],  # type: ignore[arg-type]
        name=draw(_names), uuid=str(draw(st.uuids())), vcpus=draw(st.integers(1, 64)),
        memory_mib=draw(st.integers(16, 1 << 20)), firmware=firmware,  # type: ignore[arg-type]
        secure_boot=firmware == "uefi" and draw(st.booleans()),
        tpm=draw(st.sampled_from(["none", "emulated-2.0"])),
        disks=draw(st.lists(_disks, max_size=4)), nics=draw(st.lists(_nics, max_size=3)),
        display=draw(st.sampled_from(["spice", "vnc", "both", "none"])),
        listen=draw(st.sampled_from(["127.0.0.1", "0.0.0.0", "::1"])),
        password=draw(st.from_regex(r"[a-zA-Z0-9]{0,8}", fullmatch=True)),
        video=draw(st.sampled_from(["virtio", "none"])),
        sound=draw(st.sampled_from(["ich9", "none"])), usb=draw(st.booleans()),
        rng=draw(st.booleans()), balloon=draw(st.booleans()),
        guest_agent=draw(st.booleans()), hostdevs=draw(st.lists(_hostdevs, max_size=2)),
        usb_hostdevs=draw(st.lists(_usb, max_size=2)),
        cpu=draw(st.sampled_from(["", "maximum", "host-passthrough", "host-model", "Nehalem"])),
        nested=draw(st.booleans()), kernel=kernel,
        initrd=draw(_paths) if kernel and draw(st.booleans()) else "",
        cmdline=draw(st.text(max_size=40)) if kernel else "",
        autostart=draw(st.booleans()),
        cdrom=draw(st.one_of(st.none(), st.builds(Cdrom, path=st.one_of(st.just(""), _paths)))),
        seed=draw(st.one_of(st.just(""), _paths)),
        profile=draw(st.sampled_from(["generic", "windows"])))
    return spec, draw(st.sampled_from(["kvm", "tcg"]))


@pytest.mark.integration
@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(_specs())
def test_vm_every_checked_spec_gives_valid_xml(tmp_path: Path, case: tuple[VmSpec, str]) -> None:
    tool = shutil.which("virt-xml-validate")
    require(tool is not None, "virt-xml-validate (package libvirt-clients)")
    spec, accel = case
    try:
        spec_rules.check_spec(spec)
    except BadRequest:  # the property: whatever check_spec lets through is valid
        return
    xml = domain_xml.build(spec, accelerator=accel,  # type: ignore[arg-type]
                           serial_log="/var/log/x.log")
    kept = spec.password if spec.display != "none" else ""  # it lives in <graphics> only
    assert domain_xml.spec_of(xml) == msgspec.structs.replace(spec, password=kept)
    path = tmp_path / "domain.xml"
    path.write_text(xml)
    done = subprocess.run([str(tool), str(path), "domain"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr + xml
