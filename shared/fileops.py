"""File operations that more than one agent needs, written once: where a file holds data,
reflink or sparse copy, writes at an offset, durable publish, and what "out of space" means.

The storage agent's pools and the catalogue's image pool both move big sparse RAW files:
both copy only data extents (holes stay holes), both make a file durable before its name
appears, and both report a full filesystem as ``InsufficientResources``. The callers keep
their own policy (which directory, which names, what a refusal says); this module holds
the system calls.

    fd_in, fd_out = os.open("base.raw", os.O_RDONLY), os.open("copy.raw", os.O_RDWR | os.O_CREAT)
    clone(fd_in, fd_out)                  # "reflink" on XFS/btrfs, else "copy" (holes kept)
    data_extents(fd_in, os.fstat(fd_in).st_size)   # [(0, 1048576), (8388608, 4096)]
    os.fsync(fd_out)
    publish("copy.raw", "disk1.raw")      # link into place, then flush the directory
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import mmap
import os
import threading
from collections.abc import Callable
from contextlib import suppress
from typing import Literal

from shared.errors import BackendError, BadRequest, Cancelled, InsufficientResources, PhyError

FICLONE = 0x40049409  # _IOW(0x94, 9, int)
COPY_STEP = 64 << 20  # bytes per copy_file_range call: big enough to be cheap, small to cancel
READ_STEP = 8 << 20
ZEROS = bytes(READ_STEP)
DIRECT_ALIGN = 4096  # O_DIRECT offsets and lengths: a multiple of any device's logical block
# The filesystem is full, or the writer's quota is.
NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})
# FICLONE answers these where the two files cannot share blocks (another filesystem, no
# reflink support, not regular files): copy instead.
NO_REFLINK = frozenset({errno.EXDEV, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOTTY,
                        errno.EPERM, errno.EBADF})
# copy_file_range answers these where the kernel cannot copy between the two: read and write.
NO_COPY_RANGE = frozenset({errno.EXDEV, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS})

Extent = tuple[int, int]  # (offset, length) in bytes
Piece = tuple[int, int, int]  # (offset in an image, length, offset in the file that holds it)
Progress = Callable[[int, int], None]


def human_bytes(n: float) -> str:
    """``2.1 GiB``: sizes in messages and tables."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def os_error(e: OSError, where: str, doing: str, outcome: str) -> PhyError:
    """The ``shared.errors`` form of ``e``, raised in ``where`` (e.g. "pool
    'default'") while ``doing`` something; ``outcome`` says what became of the work.

    Out of space or quota is ``InsufficientResources`` (the operator frees space), a file
    over the filesystem's size limit ``BadRequest``, anything else ``BackendError``.
    """
    if e.errno in NO_SPACE:
        return InsufficientResources(f"{where} ran out of space while {doing}; {outcome}: "
                                     "free some space or use another pool")
    if e.errno == errno.EFBIG:
        return BadRequest(f"{where}: {doing}: the size is over what its filesystem allows for "
                          "one file")
    return BackendError(f"{where}: {doing}: {e.strerror or e}")


# -- where the data is -------------------------------------------------------------------------


def data_extents(fd: int, size: int) -> list[Extent]:
    """The (offset, length) ranges of ``fd`` that hold data, from SEEK_DATA / SEEK_HOLE.

    Only ENXIO means "no data after here"; a filesystem without hole reporting (EINVAL,
    EOPNOTSUPP) yields one extent over the whole file, and any other error is raised:
    taking it for the end would silently drop the rest of a disk.
    """
    out: list[Extent] = []
    off = 0
    while off < size:
        try:
            start = os.lseek(fd, off, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                break
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                return [(0, size)] if size else []
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        if end > start:
            out.append((start, end - start))
        off = end
    return out


def sha256_pieces(fd: int, size: int, pieces: list[Piece], *, what: str = "the file",
                  progress: Progress | None = None,
                  cancel: threading.Event | None = None) -> str:
    """sha256 of an image of ``size`` bytes whose data are ``pieces`` of ``fd`` (sorted by
    image offset, apart) and zeros everywhere else, reading only the pieces.

    A sparse file is its own image (``(off, n, off)`` for each data extent); an uncompressed
    qcow2 maps its guest ranges to clusters elsewhere in the file (``qemu-img map``), so the
    RAW it converts to can be hashed from the qcow2 while ``qemu-img convert`` writes it.
    """
    h = hashlib.sha256()
    pos = 0
    for off, length, at in [*pieces, (size, 0, 0)]:
        _hash_zeros(h, off - pos)
        end = off + length
        while off < end:
            if cancel is not None and cancel.is_set():
                raise Cancelled("sha256 cancelled")
            data = os.pread(fd, min(READ_STEP, end - off), at)
            if not data:
                raise BackendError(f"{what} ended at byte {at} while being read: did it "
                                   "shrink?")
            h.update(data)
            off += len(data)
            at += len(data)
            if progress:
                progress(off, size)
        pos = end
    return h.hexdigest()


def _hash_zeros(h: hashlib._Hash, n: int) -> None:
    zeros = memoryview(ZEROS)
    while n > 0:
        step = min(n, len(zeros))
        h.update(zeros[:step])
        n -= step


# -- copies ------------------------------------------------------------------------------------


def reflink(src: int, dst: int) -> bool:
    """Make ``dst`` share ``src``'s blocks (FICLONE): True, or False where the filesystem
    cannot (then copy); other errors (out of space, I/O) are raised."""
    try:
        fcntl.ioctl(dst, FICLONE, src)
    except OSError as e:
        if e.errno not in NO_REFLINK:
            raise
        return False
    return True


def copy_sparse(src: int, dst: int, *, progress: Progress | None = None,
                cancel: threading.Event | None = None) -> tuple[int, int]:
    """Make ``dst`` a copy of ``src`` that reads only its data extents; holes stay holes.

    Returns (data bytes copied, hole bytes skipped). The caller fsyncs ``dst``.
    """
    size = os.fstat(src).st_size
    extents = data_extents(src, size)
    os.ftruncate(dst, size)
    copied = copy_extents(src, dst, extents, progress=progress, cancel=cancel)
    return copied, size - sum(n for _, n in extents)


def clone(src: int, dst: int) -> Literal["reflink", "copy"]:
    """``dst`` (empty, opened for writing) becomes ``src``: a reflink where the filesystem
    shares blocks, else a sparse copy. The caller fsyncs ``dst``."""
    if reflink(src, dst):
        return "reflink"
    copy_sparse(src, dst)
    return "copy"


def copy_extents(src: int, dst: int, extents: list[Extent], *, progress: Progress | None = None,
                 cancel: threading.Event | None = None) -> int:
    """Copy only ``extents`` from ``src`` to the same offsets of ``dst``; returns the bytes.

    ``copy_file_range`` moves the data inside the kernel in big steps (64 MiB: measured as
    fast as larger steps, and a cancel is seen within one); where it cannot (another
    filesystem type), pread/pwrite does the same. The caller fsyncs.
    """
    total = sum(n for _, n in extents)
    done = 0
    use_cfr = True
    for off, length in extents:
        end = off + length
        while off < end:
            if cancel is not None and cancel.is_set():
                raise Cancelled("copy cancelled; the partial copy was removed")
            step = min(COPY_STEP, end - off)
            n = 0
            if use_cfr:
                try:
                    n = os.copy_file_range(src, dst, step, off, off)
                except OSError as e:
                    if e.errno not in NO_COPY_RANGE:
                        raise
                    use_cfr = False
            if not use_cfr:
                data = os.pread(src, min(step, READ_STEP), off)
                write_at(dst, data, off)
                n = len(data)
            if n == 0:
                raise BackendError("the source ended early: was it truncated during the copy?")
            # Start writing this step back now, so that the final fsync finds little left
            # to do (measured: 1 GiB durable in 0.5 s instead of 0.9 s).
            os.posix_fadvise(dst, off, n, os.POSIX_FADV_DONTNEED)
            off += n
            done += n
            if progress:
                progress(done, total)
    return done


def write_at(fd: int, data: bytes | memoryview, off: int) -> None:
    """Write all of ``data`` at ``off`` (pwrite may write less than asked)."""
    view = memoryview(data)
    pos = 0
    while pos < len(view):
        pos += os.pwrite(fd, view[pos:], off + pos)


def open_direct(name: str | os.PathLike[str], *, dir_fd: int | None = None) -> int:
    """A write-only O_DIRECT descriptor of the existing file ``name``, or -1 where its
    filesystem has none (tmpfs before Linux 6.6, some FUSE and network filesystems)."""
    try:
        return os.open(name, os.O_WRONLY | os.O_DIRECT | os.O_NOFOLLOW | os.O_CLOEXEC,
                       dir_fd=dir_fd)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        return -1


def set_direct(fd: int, on: bool) -> bool:
    """Turn O_DIRECT on or off for the open file ``fd`` (its reads and writes then go past
    the page cache, in ``DIRECT_ALIGN`` multiples from aligned memory); False where its
    filesystem has none, and the descriptor is left as it was."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    want = flags | os.O_DIRECT if on else flags & ~os.O_DIRECT
    if want != flags:
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, want)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            return False
    return True


_aligned = threading.local()  # per thread: the page-aligned buffer of its O_DIRECT writes


def write_direct(direct: int, fd: int, data: bytes | memoryview, off: int) -> None:
    """Write ``data`` at ``off`` of a file open as ``fd`` and (O_DIRECT) as ``direct``.

    Big received pieces that will be fsynced anyway go past the page cache: copied once into
    an aligned buffer (O_DIRECT needs one; a ``bytes`` object is not), then written by DMA,
    where the page cache would allocate, zero, copy into and write back every page (measured
    on a transfer's receiver: a third less CPU, and the fsync after has nothing to flush).
    A piece whose offset or length is not a multiple of ``DIRECT_ALIGN``, or a ``direct`` of
    -1, goes through ``fd``. Each thread keeps one buffer, as big as its biggest piece.
    """
    n = len(data)
    if direct < 0 or off % DIRECT_ALIGN or n % DIRECT_ALIGN or not n:
        write_at(fd, data, off)
        return
    buf: mmap.mmap | None = getattr(_aligned, "buf", None)
    if buf is None or len(buf) < n:
        buf = _aligned.buf = mmap.mmap(-1, n)
    buf[:n] = data
    write_at(direct, memoryview(buf)[:n], off)


# -- durable names -----------------------------------------------------------------------------


def fsync_path(path: str | os.PathLike[str], *, dir_fd: int | None = None) -> None:
    """Flush a file, or a directory's entries, to disk by name."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(temp: str | os.PathLike[str], name: str | os.PathLike[str], *,
            dir_fd: int | None = None, replace: bool = False) -> None:
    """Make the finished, fsynced ``temp`` visible as ``name`` (same directory), durably.

    Without ``replace`` the name is linked, so an existing ``name`` raises FileExistsError
    and nothing changes; with it, ``name`` is atomically replaced. The directory is flushed
    after, so a crash leaves either the old state or the new one, never a half file.
    """
    if replace:
        os.replace(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    else:
        os.link(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
        os.unlink(temp, dir_fd=dir_fd)
    if dir_fd is not None:
        os.fsync(dir_fd)
    else:
        fsync_path(os.path.dirname(os.path.abspath(name)))


def write_atomic(name: str | os.PathLike[str], data: bytes, *, dir_fd: int | None = None,
                 mode: int = 0o600) -> None:
    """Replace the small file ``name`` with ``data``: a reader sees the old or the new whole
    file, and after a crash the new one if this returned. Never writes through a symlink."""
    temp = f"{os.fspath(name)}.new"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 mode, dir_fd=dir_fd)
    try:
        try:
            write_at(fd, data, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        publish(temp, name, dir_fd=dir_fd, replace=True)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(temp, dir_fd=dir_fd)
        raise
