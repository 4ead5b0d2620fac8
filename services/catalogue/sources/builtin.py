"""The built-in image ``phyllome-tiny``, so that the catalogue and the demo work offline.

``deploy/images/build-tiny.sh DIR`` writes ``disk.raw`` and a ``manifest.json`` (with the
disk's sha256 and size) into ``DIR``; the agent's ``builtin_dir`` points there. The entry
is always listed; it is downloadable (pulled by reflink or copy into the pool, verified
against the manifest's sha256) once ``disk.raw`` is there.

    >>> entries("/nonexistent")[0].downloadable
    False
"""

from __future__ import annotations

import json
from pathlib import Path

from shared.messages.catalogue import CatalogueEntry, Download, Requirements, Resources

SOURCE = "builtin"
TINY = "phyllome-tiny"
MiB = 1 << 20


def entries(builtin_dir: str | Path) -> list[CatalogueEntry]:
    root = Path(builtin_dir)
    disk = root / "disk.raw"
    downloads = []
    if disk.is_file():
        sha, size = _published(root / "manifest.json")
        downloads.append(Download(arch="x86_64", url=disk.resolve().as_uri(), format="raw",
                                  sha256=sha, size=size or disk.stat().st_size))
    return [CatalogueEntry(
        id=TINY, name="Phyllome tiny (busybox, signed shim/GRUB/kernel)", source=SOURCE,
        vendor="Phyllome", family="linux", distro="phyllome", version="1", archs=["x86_64"],
        downloads=downloads, upstream_id=str(disk),
        requirements=Requirements(
            minimum=Resources(cpus=1, ram=128 * MiB, storage=96 * MiB),
            recommended=Resources(cpus=1, ram=256 * MiB, storage=96 * MiB),
            firmware="efi", secure_boot=True, tpm="2.0"))]


def _published(manifest: Path) -> tuple[str, int]:
    """The disk's sha256 and size as the image build recorded them ("" / 0 if unknown)."""
    try:
        files = json.loads(manifest.read_text()).get("files", {})
        disk = files.get("disk.raw", {})
        return str(disk.get("sha256", "")), int(disk.get("size", 0))
    except (OSError, ValueError, AttributeError):
        return "", 0
