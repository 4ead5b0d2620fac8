"""Small real filesystems for storage tests: XFS with reflink or ext4 on a loop device, made
inside the test and always unmounted; and sparse images with scattered data.

    def test_x(xfs_reflink):          # a mounted 2 GiB XFS (reflink=1) directory; ext4 alike
        make_sparse(xfs_reflink / "v", 10 << 30, scatter(10 << 30, 64, 1 << 20))
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support.require import require


@contextmanager
def loop_fs(workdir: Path, size: int, fstype: str) -> Iterator[Path]:
    """Mount a fresh ``fstype`` ("xfs" with reflink, or "ext4") of ``size`` bytes."""
    mkfs = {"xfs": ["mkfs.xfs", "-q", "-m", "reflink=1"], "ext4": ["mkfs.ext4", "-q", "-F"]}
    require(os.geteuid() == 0, "root, to mount a loop filesystem")
    require(shutil.which(mkfs[fstype][0]) is not None, f"{mkfs[fstype][0]} (apt xfsprogs)")
    workdir.mkdir(parents=True, exist_ok=True)
    image, mnt = workdir / f"{fstype}.img", workdir / f"{fstype}-mnt"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(size)
    subprocess.run([*mkfs[fstype], str(image)], check=True, capture_output=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True,
                   capture_output=True)
    try:
        yield mnt
    finally:
        done = subprocess.run(["umount", str(mnt)], capture_output=True)
        if done.returncode != 0:  # something still holds it open: detach when released
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        image.unlink(missing_ok=True)


@pytest.fixture
def xfs_reflink(tmp_path: Path) -> Iterator[Path]:
    with loop_fs(tmp_path / "xfs", 2 << 30, "xfs") as mnt:
        yield mnt


@pytest.fixture
def ext4(tmp_path: Path) -> Iterator[Path]:
    """A mounted 16 GiB ext4 (sparse; no reflink), whatever filesystem holds the test's
    directory."""
    with loop_fs(tmp_path / "ext4", 16 << 30, "ext4") as mnt:
        yield mnt


@pytest.fixture
def small_ext4(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB ext4: small enough to fill in a test."""
    with loop_fs(tmp_path / "ext4", 64 << 20, "ext4") as mnt:
        yield mnt


def scatter(size: int, count: int, length: int, seed: int = 1) -> list[tuple[int, int]]:
    """``count`` non-overlapping extents of ``length`` bytes at random aligned places."""
    rng = random.Random(seed)
    slots = rng.sample(range(size // length), count)
    return sorted((s * length, length) for s in slots)


def make_sparse(path: Path, size: int, extents: list[tuple[int, int]], seed: int = 1) -> None:
    """A sparse file of ``size`` bytes with random data at ``extents``, holes elsewhere."""
    rng = random.Random(seed)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, size)
        for off, length in extents:
            os.pwrite(fd, rng.randbytes(length), off)
        os.fsync(fd)
    finally:
        os.close(fd)


def same_sparse_content(a: Path, b: Path) -> bool:
    """Same size, same data extents, same bytes in them: equal content with the holes kept.

    A plain sha256 would hash every hole: 10 s per 20 GiB; this reads the data only.
    """
    from shared.fileops import data_extents

    fa, fb = os.open(a, os.O_RDONLY), os.open(b, os.O_RDONLY)
    try:
        size = os.fstat(fa).st_size
        ea, eb = data_extents(fa, size), data_extents(fb, size)
        return size == os.fstat(fb).st_size and ea == eb and all(
            os.pread(fa, n, off) == os.pread(fb, n, off) for off, n in ea)
    finally:
        os.close(fa)
        os.close(fb)
