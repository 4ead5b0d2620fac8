"""The phyllome-debian guest for tests: built once by ``deploy/images/build-debian.sh``, reused.

    from tests.support.debian import DebianImage, ensure_debian_image

    image = ensure_debian_image()       # builds on first use (3-4 min), else instant
    image.disk                          # sparse 2 GiB RAW GPT disk, OVMF Secure Boot
    image.manifest                      # manifest.json: sha256 + size, packages, build time
    image.build_seconds                 # how long its build took

    def test_x(debian_image: DebianImage) -> None: ...   # session fixture (tests/conftest.py)

The cache is ``build/images/phyllome-debian`` in the repository (or
``$PHYLLOME_IMAGE_CACHE``): the image is rebuilt when the build script, the files of
``deploy/images/debian/`` or apt's candidate version of a listed package changed. A file
lock makes concurrent test processes build it once; downloaded .deb files stay in
``<cache>/debs-debian`` so rebuilds download only new versions. The build runs as root
(mmdebstrap's chroot).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.agents import REPO
from tests.support.require import require

IMAGES = REPO / "deploy" / "images"
BUILD_SCRIPT = IMAGES / "build-debian.sh"
INPUTS = IMAGES / "debian"
NAME = "phyllome-debian"
STAMP = "inputs.sha256"
FILES = ("disk.raw", "manifest.json")
TOOLS = ("mmdebstrap", "mkfs.ext4", "sgdisk", "mkfs.vfat", "mmd", "mcopy", "apt-cache")
BUILD_TIMEOUT_S = 1200


@dataclass(frozen=True)
class DebianImage:
    disk: Path
    manifest: Path
    kernel_version: str
    build_seconds: float  # of the build that made it (0 when unknown)
    built_now: bool  # this process built it (else it came from the cache)


def missing_tools() -> list[str]:
    """Host tools the build needs that are not on PATH (deploy/setup.sh installs them)."""
    return [tool for tool in TOOLS if shutil.which(tool) is None]


def packages() -> list[str]:
    lines = (INPUTS / "packages").read_text().splitlines()
    return [w for line in lines if not line.startswith("#") for w in line.split()]


def candidate_versions(names: list[str]) -> dict[str, str]:
    """apt's candidate version of each package (what mmdebstrap would install now)."""
    run = subprocess.run(["apt-cache", "show", "--no-all-versions", *names],
                         capture_output=True, text=True, timeout=60)
    found: dict[str, str] = {}
    package = ""
    for line in run.stdout.splitlines():
        if line.startswith("Package: "):
            package = line.split(": ", 1)[1]
        elif line.startswith("Version: ") and package:
            found[package] = line.split(": ", 1)[1]
    return found


def inputs_digest() -> str:
    """Hash of the build script, its files and the candidate versions of the packages."""
    digest = hashlib.sha256()
    for path in [BUILD_SCRIPT, *sorted(p for p in INPUTS.rglob("*") if p.is_file())]:
        digest.update(str(path.relative_to(IMAGES)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    for name, version in sorted(candidate_versions(packages()).items()):
        digest.update(f"{name}={version}\0".encode())
    return digest.hexdigest()


def _image(folder: Path, built_now: bool) -> DebianImage:
    manifest = folder / "manifest.json"
    meta = json.loads(manifest.read_text())
    return DebianImage(disk=folder / "disk.raw", manifest=manifest,
                       kernel_version=str(meta.get("kernel_version", "")),
                       build_seconds=float(meta.get("build_seconds", 0)), built_now=built_now)


def _is_current(folder: Path, digest: str) -> bool:
    try:
        stamp = (folder / STAMP).read_text().strip()
    except OSError:
        return False
    return stamp == digest and all((folder / f).is_file() for f in FILES)


def ensure_debian_image(cache_dir: Path | None = None) -> DebianImage:
    """The phyllome-debian files, built into ``cache_dir`` unless an up-to-date build is there.

    Raises RuntimeError with the end of the build's output when ``build-debian.sh`` fails.
    """
    cache = cache_dir or Path(os.environ.get("PHYLLOME_IMAGE_CACHE") or REPO / "build" / "images")
    cache.mkdir(parents=True, exist_ok=True)
    folder = cache / NAME
    digest = inputs_digest()
    if _is_current(folder, digest):
        return _image(folder, built_now=False)
    with open(cache / f"{NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if _is_current(folder, digest):  # another process built it while we waited
            return _image(folder, built_now=False)
        fresh = cache / f"{NAME}.new-{os.getpid()}"
        old = cache / f"{NAME}.old-{os.getpid()}"
        shutil.rmtree(fresh, ignore_errors=True)
        env = {**os.environ, "PHYLLOME_DEBIAN_DEBS": str(cache / "debs-debian")}
        started = time.monotonic()
        run = subprocess.run([str(BUILD_SCRIPT), str(fresh)], env=env, capture_output=True,
                             text=True, timeout=BUILD_TIMEOUT_S)
        if run.returncode != 0:
            shutil.rmtree(fresh, ignore_errors=True)
            tail = (run.stdout + run.stderr).strip().splitlines()[-30:]
            raise RuntimeError(f"{BUILD_SCRIPT} failed with {run.returncode}:\n"
                               + "\n".join(tail))
        print(f"\n{run.stdout.strip()} (wall {time.monotonic() - started:.0f} s)")
        (fresh / STAMP).write_text(digest + "\n")
        if folder.exists():
            folder.rename(old)
        fresh.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    return _image(folder, built_now=True)


@pytest.fixture(scope="session")
def debian_image() -> DebianImage:
    """The built Debian guest, shared by a whole test session."""
    missing = missing_tools()
    require(not missing, f"the tools to build phyllome-debian ({', '.join(missing)}; "
            "deploy/setup.sh packages installs them)")
    require(os.geteuid() == 0, "root to build phyllome-debian (mmdebstrap's chroot)")
    return ensure_debian_image()
