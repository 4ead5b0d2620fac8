"""Domain XML from VmSpecs: golden files, libvirt's schema, and names refused at the edge.

Regenerate the golden files after an intended change::

    PHYLLOME_REGENERATE=1 .venv/bin/pytest tests/unit/test_vm_domain_xml.py
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from services.vm import domain_xml
from shared.errors import BadRequest, InvalidName
from shared.messages.vm import Disk, Nic, VmSpec
from tests.support.require import require

GOLDEN = Path(__file__).parents[1] / "data" / "vm" / "golden"
UUID = "3f1e0c6a-5a8d-4c1e-9d0b-1c2d3e4f5a6b"
MDEV = "b1a2c3d4-0000-4000-8000-000000000001"

SPECS = {
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
}


def _xml(case: str) -> str:
    spec, accel = SPECS[case]
    return domain_xml.build(spec, accelerator=accel, serial_log=f"/var/log/phyllome/{case}.log")


@pytest.mark.unit
@pytest.mark.parametrize("case", sorted(SPECS))
def test_vm_xml_matches_golden(case: str) -> None:
    golden = GOLDEN / f"{case}.xml"
    xml = _xml(case)
    if os.environ.get("PHYLLOME_REGENERATE") == "1":
        golden.write_text(xml)
    assert golden.exists(), f"no golden file {golden}: run with PHYLLOME_REGENERATE=1"
    assert xml == golden.read_text()


@pytest.mark.integration
@pytest.mark.parametrize("case", sorted(SPECS))
def test_vm_xml_passes_virt_xml_validate(case: str, tmp_path: Path) -> None:
    tool = shutil.which("virt-xml-validate")
    require(tool is not None, "virt-xml-validate (package libvirt-clients)")
    path = tmp_path / f"{case}.xml"
    path.write_text(_xml(case))
    done = subprocess.run([str(tool), str(path), "domain"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


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
        domain_xml.check_spec(VmSpec(name=name))


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
        ({"disks": [Disk(path="relative.raw")]}, "must be absolute"),
        ({"hostdevs": ["01:00"]}, "neither a PCI address"),
        ({"nics": [Nic(mac="zz")]}, "not six hex pairs"),
        ({"uuid": "nope"}, "not a UUID"),
    ],
)
def test_vm_bad_specs_are_refused(changes: dict[str, object], match: str) -> None:
    spec = VmSpec(name="ok", **changes)  # type: ignore[arg-type]
    with pytest.raises(BadRequest, match=match):
        domain_xml.check_spec(spec)


@pytest.mark.unit
def test_vm_console_endpoints_from_live_xml() -> None:
    live = _xml("secure-boot-tpm-both").replace(
        'type="vnc" port="-1"', 'type="vnc" port="5900"'
    ).replace('type="spice" autoport="yes"', 'type="spice" port="5901" autoport="yes"')
    consoles = domain_xml.consoles_of(live)
    assert consoles["vnc"].uri == "vnc://127.0.0.1:5900"
    assert consoles["spice"].port == 5901
    assert domain_xml.consoles_of(_xml("secure-boot-tpm-both")) == {}
