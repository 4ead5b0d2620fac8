"""The built-in source's phyllome-debian entry: listed before it is built (not downloadable,
saying so), downloadable and verified against its manifest once built, with a UEFI +
Secure Boot + TPM template."""

from __future__ import annotations

import json
from pathlib import Path

from services.catalogue.handlers import template
from services.catalogue.sources import builtin

MiB = 1 << 20


def test_debian_is_listed_before_it_is_built(tmp_path: Path) -> None:
    [entry] = [e for e in builtin.entries(tmp_path) if e.id == builtin.DEBIAN]
    assert not entry.downloadable
    assert "not built yet" in entry.name


def test_debian_once_built_is_downloadable_with_its_sha256_and_a_secure_template(
        tmp_path: Path) -> None:
    folder = tmp_path / builtin.DEBIAN
    folder.mkdir()
    with open(folder / "disk.raw", "wb") as f:
        f.truncate(2048 * MiB)
    (folder / "manifest.json").write_text(json.dumps({
        "name": builtin.DEBIAN, "suite": "bookworm", "kernel_version": "6.1.0-57-cloud-amd64",
        "files": {"disk.raw": {"sha256": "ab" * 32, "size": 2048 * MiB}}}))
    [entry] = [e for e in builtin.entries(tmp_path) if e.id == builtin.DEBIAN]
    assert entry.downloadable and "not built" not in entry.name
    assert (entry.distro, entry.version, entry.codename) == ("debian", "12", "bookworm")
    [download] = entry.downloads
    assert (download.format, download.sha256, download.size) == ("raw", "ab" * 32, 2048 * MiB)
    t = template(entry)
    assert (t.firmware, t.secure_boot, t.tpm) == ("uefi", True, "2.0")
    assert (t.memory, t.vcpus, t.disk) == (1024 * MiB, 2, 2048 * MiB)


def test_debian_with_an_unreadable_manifest_is_unverified_not_refused(tmp_path: Path) -> None:
    folder = tmp_path / builtin.DEBIAN
    folder.mkdir()
    (folder / "disk.raw").write_bytes(b"\0" * 4096)
    (folder / "manifest.json").write_text("{not json")
    [entry] = [e for e in builtin.entries(tmp_path) if e.id == builtin.DEBIAN]
    assert entry.downloads[0].sha256 == "" and entry.downloads[0].size == 4096
