"""Guest architectures: what a host has for each (QEMU, firmware descriptors), the machine an
arch gets, the catalogue's built-in image per arch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.catalogue.sources import builtin
from services.vm import spec as spec_rules
from shared import archs
from shared.messages.hardware import GuestArch
from shared.messages.vm import VmSpec

pytestmark = pytest.mark.unit


def descriptor(folder: Path, name: str, arch: str, machines: list[str], code: Path,
               features: list[str]) -> None:
    code.write_bytes(b"\0")
    (folder / name).write_text(json.dumps({
        "interface-types": ["uefi"], "features": features,
        "mapping": {"device": "flash", "executable": {"filename": str(code)}},
        "targets": [{"architecture": arch, "machines": machines}]}))


def test_a_hosts_archs_come_from_its_qemus_and_firmware_descriptors(tmp_path: Path) -> None:
    descriptor(tmp_path, "40-aa-ms.json", "aarch64", ["virt-*"], tmp_path / "AAVMF_CODE.ms.fd",
               ["enrolled-keys", "secure-boot"])
    descriptor(tmp_path, "60-ovmf.json", "x86_64", ["pc-q35-*"], tmp_path / "OVMF_CODE.fd", [])
    # a descriptor whose firmware file is gone, one for another machine: neither counts
    (tmp_path / "50-gone.json").write_text(json.dumps({
        "interface-types": ["uefi"], "features": ["secure-boot", "enrolled-keys"],
        "mapping": {"executable": {"filename": str(tmp_path / "absent.fd")}},
        "targets": [{"architecture": "x86_64", "machines": ["pc-q35-*"]}]}))
    (tmp_path / "broken.json").write_text("{")
    which = {"qemu-system-aarch64": "/usr/bin/qemu-system-aarch64"}.get
    got = archs.guest_archs(dirs=(str(tmp_path), str(tmp_path / "absent")), which=which)
    assert got == [GuestArch(arch="x86_64", emulator="", uefi=True, secure_boot=False),
                   GuestArch(arch="aarch64", emulator="/usr/bin/qemu-system-aarch64",
                             uefi=True, secure_boot=True)]


def test_what_a_host_lacks_names_the_package() -> None:
    full = GuestArch(arch="aarch64", emulator="/q", uefi=True, secure_boot=True)
    assert archs.missing("aarch64", full, uefi=True, secure_boot=True) is None
    assert archs.missing("aarch64", None, uefi=False, secure_boot=False) == (
        "no qemu-system-aarch64 for aarch64 guests (apt-get install qemu-system-arm)")
    assert "Phyllome runs x86_64, aarch64" in (
        archs.missing("s390x", None, uefi=False, secure_boot=False) or "")


def test_arch_alone_picks_its_machine() -> None:
    arm = spec_rules.with_machine(VmSpec(name="a", arch="aarch64"))
    assert arm.machine == "virt"
    spec_rules.check_spec(arm)
    x86 = VmSpec(name="x")
    assert spec_rules.with_machine(x86) is x86


def _tiny(folder: Path, arch: str | None, sha: str) -> None:
    folder.mkdir(parents=True)
    (folder / "disk.raw").write_bytes(b"x" * 10)
    manifest: dict[str, object] = {"kernel_version": "6.1", "files": {
        "disk.raw": {"sha256": sha, "size": 10}}}
    if arch:
        manifest["arch"] = arch
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_the_builtin_tiny_has_an_image_per_arch(tmp_path: Path) -> None:
    _tiny(tmp_path / "phyllome-tiny", None, "a" * 64)  # x86_64: no arch in its manifest
    _tiny(tmp_path / "phyllome-tiny" / "aarch64", "aarch64", "b" * 64)
    entry = {e.id: e for e in builtin.entries(tmp_path)}["phyllome-tiny"]
    assert entry.archs == ["aarch64", "x86_64"]
    assert [(d.arch, d.sha256[0], d.url.endswith("aarch64/disk.raw")) for d in entry.downloads] \
        == [("x86_64", "a", False), ("aarch64", "b", True)]


def test_the_builtin_tiny_with_only_its_arm_build(tmp_path: Path) -> None:
    _tiny(tmp_path / "phyllome-tiny" / "aarch64", "aarch64", "b" * 64)
    entry = {e.id: e for e in builtin.entries(tmp_path)}["phyllome-tiny"]
    assert entry.archs == ["aarch64"] and [d.arch for d in entry.downloads] == ["aarch64"]
