"""The real osinfo-db of this machine (Debian package osinfo-db) parsed into the catalogue."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.catalogue.sources import osinfo
from shared.messages.catalogue import CatalogueEntry
from tests.support.require import require

pytestmark = pytest.mark.integration
ROOT = Path("/usr/share/osinfo")


@pytest.fixture(scope="module")
def entries() -> dict[str, CatalogueEntry]:
    require((ROOT / "os").is_dir(), "osinfo-db (apt-get install osinfo-db)")
    return {e.id: e for e in osinfo.load(ROOT)}


def test_hundreds_of_oses(entries: dict[str, CatalogueEntry]) -> None:
    assert len(entries) >= 500
    downloadable = [e for e in entries.values() if e.downloadable]
    assert len(downloadable) >= 30
    assert sum(len(e.downloads) for e in entries.values()) >= 140
    assert sum(1 for e in entries.values() if e.media) >= 400


def test_fedora_debian_ubuntu(entries: dict[str, CatalogueEntry]) -> None:
    fedora, debian, ubuntu = entries["fedora37"], entries["debian11"], entries["ubuntu22.04"]
    assert (fedora.name, fedora.vendor, fedora.family, fedora.distro) == (
        "Fedora Linux 37", "Fedora Project", "linux", "fedora")
    assert fedora.release_date == "2022-11-15" and fedora.version == "37"
    cloud = [d for d in fedora.downloads if d.arch == "x86_64" and d.format == "qcow2"]
    assert cloud and cloud[0].cloud_init and cloud[0].url.startswith("https://")
    assert debian.codename == "bullseye" and "aarch64" in debian.archs
    assert debian.requirements.minimum.ram == 1 << 30
    assert debian.requirements.recommended.storage == 20 << 30
    assert any(m.url.endswith("netinst.iso") for m in debian.media)
    assert ubuntu.name == "Ubuntu 22.04 LTS" and ubuntu.downloadable
    assert entries["debian9"].eol_date  # end-of-life dates come through


def test_windows_11_needs_tpm_and_secure_boot(
        entries: dict[str, CatalogueEntry]) -> None:
    win = entries["win11"]
    req = win.requirements
    assert (req.firmware, req.secure_boot, req.tpm) == ("uefi", True, "2.0")
    assert (req.minimum.cpus, req.minimum.ram, req.minimum.storage) == (2, 4 << 30, 64 << 30)
    assert not win.downloadable and win.media
    win10 = entries["win10"].requirements
    assert (win10.secure_boot, win10.tpm) == (False, "")


def test_resources_are_inherited_along_derives_from(
        entries: dict[str, CatalogueEntry]) -> None:
    stated = [e for e in entries.values() if e.requirements.minimum.ram]
    assert len(stated) > len(entries) // 2
