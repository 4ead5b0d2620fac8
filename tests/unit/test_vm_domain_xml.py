"""Domain XML from VmSpecs: golden files, libvirt's schema, and names refused at the edge.

Regenerate the golden files after an intended change::

    PHYLLOME_REGENERATE=1 .venv/bin/pytest tests/unit/test_vm_domain_xml.py
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Literal

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.vm import domain_xml
from services.vm import spec as spec_rules
from shared.errors import BadRequest, InvalidName
from shared.messages.vm import Disk, Nic, VmSpec
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
}


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
    ],
)
def test_vm_bad_specs_are_refused(changes: dict[str, object], match: str) -> None:
    spec = VmSpec(name="ok", **changes)  # type: ignore[arg-type]
    with pytest.raises(BadRequest, match=match):
        spec_rules.check_spec(spec)


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


@st.composite
def _specs(draw: st.DrawFn) -> tuple[VmSpec, str]:
    firmware = draw(st.sampled_from(["uefi", "bios"]))
    kernel = draw(st.one_of(st.just(""), _paths))
    spec = VmSpec(
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
        nested=draw(st.booleans()), kernel=kernel,
        initrd=draw(_paths) if kernel and draw(st.booleans()) else "",
        cmdline=draw(st.text(max_size=40)) if kernel else "",
        autostart=draw(st.booleans()))
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
