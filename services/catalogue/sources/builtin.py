"""Built-in images, first of all ``phyllome-tiny``, so the catalogue and the demo work offline.

``builtin_dir`` (default ``<state dir>/images/builtin``) holds one directory per image,
as ``deploy/images/build-tiny.sh <builtin_dir>/phyllome-tiny`` writes it: ``disk.raw`` and a
``manifest.json`` recording the disk's sha256 and size (plus the direct-boot kernel and
initramfs the VM agent uses). A build for another arch lies in a folder of that arch's name
inside (``phyllome-tiny/aarch64/``, from ``build-tiny.sh --arch aarch64``): one entry with
an image per arch. ``phyllome-tiny`` is always listed; an image is downloadable (pulled by
reflink or copy into the pool, verified against the manifest's sha256) once its
``disk.raw`` is there. ``phyllome-debian`` (``deploy/images/build-debian.sh``, a Debian 12
cloud guest with cloud-init) is listed too: ``make up`` builds it in the background and then
refreshes the catalogue, which makes it downloadable.

    >>> [(e.id, e.downloadable) for e in entries("/nonexistent")]
    [('phyllome-debian', False), ('phyllome-tiny', False)]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from services.catalogue.sources import check_id, normalize_arch
from shared.errors import PhyError
from shared.messages.catalogue import CatalogueEntry, Download, Requirements, Resources

SOURCE = "builtin"
TINY = "phyllome-tiny"
MiB = 1 << 20
# Booted from its disk under UEFI the kernel resets with 256 MiB (deploy/images/README.md).
TINY_REQUIREMENTS = Requirements(
    minimum=Resources(cpus=1, ram=384 * MiB, storage=96 * MiB),
    firmware="uefi", secure_boot=True, tpm="2.0")
DEBIAN = "phyllome-debian"
# osinfo-db's debian12 minimum (1 CPU, 1 GiB recommended); the 2 GiB disk grows with the
# VM's (cloud-init growpart). Made for UEFI with Secure Boot and a TPM 2.0 like tiny.
DEBIAN_REQUIREMENTS = Requirements(
    minimum=Resources(cpus=1, ram=512 * MiB, storage=2048 * MiB),
    recommended=Resources(cpus=2, ram=1024 * MiB, storage=2048 * MiB),
    firmware="uefi", secure_boot=True, tpm="2.0")


def entries(builtin_dir: str | Path) -> list[CatalogueEntry]:
    root = Path(builtin_dir)
    names = {TINY, DEBIAN}
    if root.is_dir():
        names |= {d.name for d in root.iterdir() if (d / "disk.raw").is_file()}
    out = []
    for name in sorted(names):
        try:
            check_id(name)
        except PhyError:
            continue
        out.append(_entry(name, root / name))
    return out


# The architectures whose builds may lie in a subfolder of an image's folder.
ARCH_FOLDERS = ("aarch64", "riscv64", "x86_64")


def _download(folder: Path, meta: dict[str, Any], arch: str) -> Download | None:
    disk = folder / "disk.raw"
    if not disk.is_file():
        return None
    published = meta.get("files", {}).get("disk.raw", {}) if isinstance(meta, dict) else {}
    return Download(
        arch=normalize_arch(str(meta.get("arch", arch))), url=disk.absolute().as_uri(),
        format="raw", sha256=str(published.get("sha256", "")),
        size=int(published.get("size", 0)) or disk.stat().st_size)


def _entry(name: str, folder: Path) -> CatalogueEntry:
    meta = _manifest(folder / "manifest.json")
    found = [_download(folder, meta, "x86_64")]  # the folder itself: x86_64 unless it says
    found += [_download(folder / arch, _manifest(folder / arch / "manifest.json"), arch)
              for arch in ARCH_FOLDERS]
    downloads = [d for d in found if d is not None]
    archs = sorted({d.arch for d in downloads}) or ["x86_64"]
    if name == DEBIAN:
        built = "" if downloads else "; not built yet: make up builds it"
        return CatalogueEntry(
            id=name, name=f"Debian 12 (cloud-init, qemu-guest-agent; signed shim, GRUB and "
            f"kernel){built}", source=SOURCE, vendor="Phyllome", family="linux",
            distro="debian", version="12", codename=str(meta.get("suite", "bookworm")),
            archs=archs, downloads=downloads, upstream_id=str(folder),
            requirements=DEBIAN_REQUIREMENTS)
    tiny = name == TINY
    return CatalogueEntry(
        id=name, name="Phyllome tiny (busybox; signed shim, GRUB and kernel)" if tiny else name,
        source=SOURCE, vendor="Phyllome", family="linux", distro="phyllome",
        version=str(meta.get("kernel_version", "")), archs=archs, downloads=downloads,
        upstream_id=str(folder), requirements=TINY_REQUIREMENTS if tiny else Requirements())


def _manifest(path: Path) -> dict[str, Any]:
    """What the image build recorded ({} when unreadable: the image is then unverified)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
