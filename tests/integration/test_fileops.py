"""shared/fileops.py on real files: a sparse file's extents, reflink on XFS and sparse copy on
ext4 (loop filesystems made in the test), durable publish, and a filesystem filled up."""

from __future__ import annotations

import errno
import fcntl
import os
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from shared import fileops
from shared.errors import BackendError, BadRequest, Cancelled, InsufficientResources
from tests.support.loopfs import (
    make_sparse,
    same_sparse_content,
    scatter,
)

MiB = 1 << 20
GiB = 1 << 30


@contextmanager
def opened(path: Path, flags: int = os.O_RDONLY) -> Iterator[int]:
    fd = os.open(path, flags, 0o600)
    try:
        yield fd
    finally:
        os.close(fd)


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def test_extents_of_a_sparse_file_are_its_data(tmp_path: Path) -> None:
    data = [(0, MiB), (5 * MiB, 2 * MiB), (GiB - MiB, MiB)]  # at the start and the end
    make_sparse(tmp_path / "v", GiB, data)
    with opened(tmp_path / "v") as fd:
        assert fileops.data_extents(fd, GiB) == data
        # cut at the size asked for: a file that grew is read to where it was
        assert fileops.data_extents(fd, 6 * MiB) == [(0, MiB), (5 * MiB, MiB)]


def test_extents_of_empty_and_all_hole_files(tmp_path: Path) -> None:
    (tmp_path / "empty").touch()
    make_sparse(tmp_path / "holes", GiB, [])
    with opened(tmp_path / "empty") as a, opened(tmp_path / "holes") as b:
        assert fileops.data_extents(a, 0) == []
        assert fileops.data_extents(b, GiB) == []


def test_an_error_other_than_enxio_is_raised_not_taken_for_the_end() -> None:
    # A pipe cannot seek (ESPIPE): taking that for "no more data" would copy nothing at all.
    r, w = os.pipe()
    try:
        with pytest.raises(OSError) as caught:
            fileops.data_extents(r, MiB)
        assert caught.value.errno == errno.ESPIPE
    finally:
        os.close(r)
        os.close(w)


def test_clone_on_ext4_is_a_sparse_copy(small_ext4: Path) -> None:
    src, dst = small_ext4 / "src", small_ext4 / "dst"
    data = scatter(GiB, 8, MiB)
    make_sparse(src, GiB, data)
    with opened(src) as s, opened(dst, os.O_RDWR | os.O_CREAT) as d:
        assert fileops.clone(s, d) == "copy"
    assert same_sparse_content(src, dst)
    assert allocated(dst) < 9 * MiB  # the holes stayed holes: 8 MiB of data in 1 GiB


def test_clone_on_xfs_is_a_reflink(xfs_reflink: Path) -> None:
    src, dst = xfs_reflink / "src", xfs_reflink / "dst"
    make_sparse(src, 20 * GiB, scatter(20 * GiB, 16, MiB))
    with opened(src) as s, opened(dst, os.O_RDWR | os.O_CREAT) as d:
        assert fileops.clone(s, d) == "reflink"
    assert same_sparse_content(src, dst)


def test_reflink_across_filesystems_says_copy_instead(tmp_path: Path,
                                                       xfs_reflink: Path) -> None:
    make_sparse(xfs_reflink / "src", 4 * MiB, [(0, MiB)])
    with opened(xfs_reflink / "src") as s, opened(tmp_path / "dst", os.O_RDWR | os.O_CREAT) as d:
        assert not fileops.reflink(s, d)  # EXDEV
        assert fileops.copy_sparse(s, d) == (MiB, 3 * MiB)
    assert same_sparse_content(xfs_reflink / "src", tmp_path / "dst")


def test_copy_sparse_reports_progress_and_stops_on_cancel(tmp_path: Path) -> None:
    make_sparse(tmp_path / "src", GiB, scatter(GiB, 4, 64 * MiB))
    cancel = threading.Event()
    seen: list[tuple[int, int]] = []

    def progress(done: int, total: int) -> None:
        seen.append((done, total))
        cancel.set()

    with opened(tmp_path / "src") as s, opened(tmp_path / "dst", os.O_RDWR | os.O_CREAT) as d:
        with pytest.raises(Cancelled, match="cancelled"):
            fileops.copy_sparse(s, d, progress=progress, cancel=cancel)
    assert seen == [(64 * MiB, 256 * MiB)]


def test_write_at_writes_everything_at_the_offset(tmp_path: Path) -> None:
    payload = os.urandom(3 * MiB + 7)
    with opened(tmp_path / "f", os.O_RDWR | os.O_CREAT) as fd:
        fileops.write_at(fd, payload, 5 * MiB)
        assert os.fstat(fd).st_size == 8 * MiB + 7
        assert os.pread(fd, len(payload), 5 * MiB) == payload


def test_write_direct_sends_aligned_pieces_past_the_page_cache(tmp_path: Path) -> None:
    # the O_DIRECT descriptor here is of another file, to see which way each piece went
    buffered, direct = tmp_path / "buffered", tmp_path / "direct"
    for path in (buffered, direct):
        path.write_bytes(bytes(64 * 1024))
    aligned, odd = os.urandom(8192), os.urandom(100)
    with opened(buffered, os.O_RDWR) as fd:
        d = fileops.open_direct(direct)
        assert d >= 0, "ext4 and XFS take O_DIRECT"
        try:
            fileops.write_direct(d, fd, aligned, 4096)      # aligned: the direct descriptor
            fileops.write_direct(d, fd, odd, 16384)         # odd length: through the page cache
            fileops.write_direct(d, fd, aligned, 20000)     # odd offset: likewise
            fileops.write_direct(-1, fd, aligned, 32768)    # no O_DIRECT on this filesystem
        finally:
            os.close(d)
    got, went = buffered.read_bytes(), direct.read_bytes()
    assert went[4096:12288] == aligned and got[4096:12288] == bytes(8192)
    assert got[16384:16484] == odd and got[20000:28192] == aligned
    assert got[32768:40960] == aligned and went[16384:] == bytes(len(went) - 16384)


def test_set_direct_turns_o_direct_on_and_off(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(bytes(8192))
    with opened(tmp_path / "f", os.O_RDWR) as fd:
        assert fileops.set_direct(fd, True), "ext4 and XFS take O_DIRECT"
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT
        assert fileops.set_direct(fd, True)  # already on: nothing changes
        assert fileops.set_direct(fd, False)
        assert not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT
        assert os.pread(fd, 100, 7) == bytes(100)  # unaligned again


def test_open_direct_of_a_symlink_is_refused(tmp_path: Path) -> None:
    (tmp_path / "real").write_bytes(b"")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(OSError) as raised:
        fileops.open_direct(tmp_path / "link")
    assert raised.value.errno == errno.ELOOP


def test_publish_links_and_never_replaces_unless_asked(tmp_path: Path) -> None:
    (tmp_path / "temp").write_bytes(b"new")
    (tmp_path / "name").write_bytes(b"old")
    with pytest.raises(FileExistsError):
        fileops.publish(tmp_path / "temp", tmp_path / "name")
    assert (tmp_path / "name").read_bytes() == b"old" and (tmp_path / "temp").exists()
    fileops.publish(tmp_path / "temp", tmp_path / "name", replace=True)
    assert (tmp_path / "name").read_bytes() == b"new" and not (tmp_path / "temp").exists()
    dir_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        (tmp_path / "t2").write_bytes(b"x")
        fileops.publish("t2", "other", dir_fd=dir_fd)
    finally:
        os.close(dir_fd)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["name", "other"]


def test_write_atomic_replaces_and_never_follows_a_link(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    fileops.write_atomic(target, b"one")
    fileops.write_atomic(target, b"two", mode=0o644)
    assert target.read_bytes() == b"two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
    outside = tmp_path / "outside"
    outside.write_bytes(b"keep")
    (tmp_path / "state.json.new").symlink_to(outside)
    with pytest.raises(OSError) as caught:
        fileops.write_atomic(target, b"three")
    assert caught.value.errno == errno.ELOOP
    assert outside.read_bytes() == b"keep" and target.read_bytes() == b"two"


def test_a_full_filesystem_is_insufficient_resources(small_ext4: Path) -> None:
    filler = small_ext4 / "filler"
    free = os.statvfs(small_ext4).f_bavail * os.statvfs(small_ext4).f_frsize
    subprocess.run(["fallocate", "-l", str(free), str(filler)], check=True)
    with opened(small_ext4 / "f", os.O_RDWR | os.O_CREAT) as fd, \
            pytest.raises(OSError) as caught:
        fileops.write_at(fd, os.urandom(8 * MiB), 0)  # past root's reserve too
    assert caught.value.errno == errno.ENOSPC
    err = fileops.os_error(caught.value, "pool 'small'", "cloning a to b",
                           "nothing was left behind")
    assert isinstance(err, InsufficientResources)
    assert err.message == ("pool 'small' ran out of space while cloning a to b; "
                           "nothing was left behind: free some space or use another pool")
    quota = fileops.os_error(OSError(errno.EDQUOT, "Disk quota exceeded"), "x", "y", "z")
    assert isinstance(quota, InsufficientResources)


def test_a_file_too_big_and_other_errors(tmp_path: Path) -> None:
    with opened(tmp_path / "f", os.O_RDWR | os.O_CREAT) as fd, \
            pytest.raises(OSError) as caught:
        fileops.write_at(fd, b"x", 1 << 62)  # past any filesystem's largest file
    assert caught.value.errno == errno.EFBIG
    too_big = fileops.os_error(caught.value, "pool 'p'", "resizing v", "-")
    assert isinstance(too_big, BadRequest) and "allows for one file" in too_big.message
    io = fileops.os_error(OSError(errno.EIO, "Input/output error"), "pool 'p'",
                          "reading v", "-")
    assert type(io) is BackendError
    assert io.message == "pool 'p': reading v: Input/output error"


@pytest.mark.parametrize(("n", "text"), [
    (0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (2.1 * GiB, "2.1 GiB"),
    (5 << 40, "5.0 TiB"), (2048 << 40, "2048.0 TiB"), (-2048, "-2.0 KiB"),
])
def test_human_bytes(n: float, text: str) -> None:
    assert fileops.human_bytes(n) == text
