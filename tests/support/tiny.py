"""The phyllome-tiny guest for tests: built once by ``deploy/images/build-tiny.sh``, then reused.

    from tests.support.tiny import TinyImage, ensure_tiny_image, tiny_image

    image = ensure_tiny_image()          # builds on first use (about 10 s), else instant
    image.kernel, image.initrd           # direct kernel boot: vmlinuz, initrd.gz
    image.disk                           # sparse RAW GPT disk, boots under OVMF Secure Boot
    image.manifest                       # manifest.json: sha256 + size per file, packages
    image.kernel_version                 # what the guest prints as "PHYLLOME-TINY: kernel=..."

    def test_x(tiny_image: TinyImage) -> None: ...   # session fixture; import it explicitly

    arm = ensure_tiny_image(arch="aarch64")   # the arm64 build (build-tiny.sh --arch aarch64):
    def test_y(tiny_image_aarch64: TinyImage) -> None: ...   # serial ttyAMA0, AAVMF

The guest prints ``PHYLLOME-TINY: key=value`` lines on ttyS0 (kernel, firmware, secureboot, tpm,
virtio, disks, mode, ready; see deploy/images/README.md), then powers off, or with
``phyllome.stay=1`` on its command line stays up until the ACPI power button. The disk's
GRUB always passes ``phyllome.stay=1``. Give a UEFI guest booted from the disk at least
384 MiB (with 256 MiB the kernel resets right after GRUB hands over).

The cache is ``build/images/`` in the repository, or ``$PHYLLOME_IMAGE_CACHE`` (another
arch's build in ``<cache>/<arch>/phyllome-tiny``); the image is rebuilt when the build script
or the guest's files changed. A file lock makes concurrent test processes build it once;
downloaded .deb files stay in ``<cache>/debs`` so rebuilds need no network.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.agents import REPO
from tests.support.require import require

IMAGES = REPO / "deploy" / "images"
BUILD_SCRIPT = IMAGES / "build-tiny.sh"
NAME = "phyllome-tiny"
STAMP = "inputs.sha256"
FILES = ("vmlinuz", "initrd.gz", "disk.raw", "manifest.json")
TOOLS = ("apt-get", "apt-cache", "dpkg-deb", "depmod", "modprobe", "cpio", "gzip", "sgdisk",
         "mkfs.vfat", "mmd", "mcopy")


@dataclass(frozen=True)
class TinyImage:
    """The built guest's files (all in one directory) and its kernel version."""

    kernel: Path
    initrd: Path
    disk: Path
    manifest: Path
    kernel_version: str

    def boot_files_in(self, folder: Path) -> tuple[Path, Path]:
        """Copies of the kernel and initrd in ``folder`` (one QEMU can read), readable by all."""
        copies = []
        for src in (self.kernel, self.initrd):
            shutil.copy(src, folder / src.name)
            (folder / src.name).chmod(0o644)
            copies.append(folder / src.name)
        return copies[0], copies[1]


def missing_tools() -> list[str]:
    """Host tools the build needs that are not on PATH (apt packages: see the README)."""
    return [tool for tool in TOOLS if shutil.which(tool) is None]


def inputs_digest() -> str:
    """Hash of everything the build reads from the repository: build-tiny.sh and tiny/
    (not phyllome-debian's files, whose changes must not rebuild this image)."""
    digest = hashlib.sha256()
    inputs = [IMAGES / "build-tiny.sh", *(IMAGES / "tiny").rglob("*")]
    for path in sorted(p for p in inputs if p.is_file()):
        digest.update(str(path.relative_to(IMAGES)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def _image(folder: Path) -> TinyImage:
    manifest = folder / "manifest.json"
    kernel_version = json.loads(manifest.read_text())["kernel_version"]
    return TinyImage(kernel=folder / "vmlinuz", initrd=folder / "initrd.gz",
                     disk=folder / "disk.raw", manifest=manifest,
                     kernel_version=kernel_version)


def _is_current(folder: Path, digest: str) -> bool:
    try:
        stamp = (folder / STAMP).read_text().strip()
    except OSError:
        return False
    return stamp == digest and all((folder / f).is_file() for f in FILES)


def ensure_tiny_image(cache_dir: Path | None = None, *, arch: str = "x86_64") -> TinyImage:
    """The phyllome-tiny files for ``arch``, built into ``cache_dir`` unless an up-to-date
    build is there.

    Raises RuntimeError with the build's output when ``build-tiny.sh`` fails.
    """
    root = cache_dir or Path(os.environ.get("PHYLLOME_IMAGE_CACHE") or REPO / "build" / "images")
    cache = root if arch == "x86_64" else root / arch
    cache.mkdir(parents=True, exist_ok=True)
    folder = cache / NAME
    digest = inputs_digest()
    if _is_current(folder, digest):
        return _image(folder)
    with open(cache / f"{NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if _is_current(folder, digest):  # another process built it while we waited
            return _image(folder)
        fresh = cache / f"{NAME}.new-{os.getpid()}"
        old = cache / f"{NAME}.old-{os.getpid()}"
        shutil.rmtree(fresh, ignore_errors=True)
        env = {**os.environ, "PHYLLOME_TINY_DEBS": str(root / "debs")}
        args = [] if arch == "x86_64" else ["--arch", arch]
        run = subprocess.run([str(BUILD_SCRIPT), *args, str(fresh)], env=env,
                             capture_output=True, text=True, timeout=600)
        if run.returncode != 0:
            shutil.rmtree(fresh, ignore_errors=True)
            tail = (run.stdout + run.stderr).strip().splitlines()[-20:]
            raise RuntimeError(f"{BUILD_SCRIPT} failed with {run.returncode}:\n"
                               + "\n".join(tail))
        (fresh / STAMP).write_text(digest + "\n")
        if folder.exists():
            folder.rename(old)
        fresh.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    return _image(folder)


@pytest.fixture(scope="session")
def tiny_image() -> TinyImage:
    """The built guest, shared by a whole test session (missing build tools: see require)."""
    missing = missing_tools()
    require(not missing, f"the tools to build phyllome-tiny ({', '.join(missing)})")
    return ensure_tiny_image()


@pytest.fixture(scope="session")
def tiny_image_aarch64() -> TinyImage:
    """The arm64 build of the guest (its packages come with the first build: about 25 MB)."""
    missing = missing_tools()
    require(not missing, f"the tools to build phyllome-tiny ({', '.join(missing)})")
    return ensure_tiny_image(arch="aarch64")
