"""The storage agent's filesystem adapter: directory pools of RAW volumes.

This module alone touches the pools' files (with the primitives of ``shared/fileops.py``);
the transfer code reads and writes through it. Every volume is one regular file directly in
its pool's directory, opened relative to a directory descriptor held since start, with
``O_NOFOLLOW``: a symlink planted in a pool is refused, never followed, and nothing outside
a pool is read or written (imports read only from the configured import directories). New
volumes appear under their name only once complete: they are written to a hidden temporary
name, fsynced, then hard-linked into place (which fails rather than replaces when the name
exists).

    pools = Pools({"default": "/var/lib/phyllome/pools/default"})
    pools.create("default", "disk0", 10 << 30)
    pools.clone("default", "disk0", "default", "disk1")   # reflink, or sparse copy
    pools.info("default", "disk1").allocated_bytes
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import stat
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Literal, Protocol

from shared import fileops
from shared.errors import (
    BackendError,
    BadRequest,
    Conflict,
    Forbidden,
    InsufficientResources,
    InvalidName,
    NotFound,
    PhyError,
)
from shared.fileops import READ_STEP, ZEROS, data_extents, human_bytes, sha256_pieces
from shared.messages.storage import Extent, PoolInfo, PoolRoom, VolumeInfo
from shared.validate import HEAD_BYTES, TAIL_BYTES, conversion_hint, disk_format

TEMP_PREFIX = "."  # volumes never start with a dot; every temporary file does
NAME_MAX = 255
_NAME_OK = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+\-]*$")
_POOL_OK = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_\-]{0,63}$")

Progress = Callable[[int, int], None]
CloneMethod = Literal["reflink", "copy", "rename"]


def check_name(name: str, what: str = "volume name") -> str:
    """``name`` if it is a safe volume name (one path component, no tricks), else InvalidName."""
    if not isinstance(name, str) or not name:
        raise InvalidName(f"{what} is empty; give a name like 'disk0' or 'web-1.raw'")
    if "\x00" in name:
        raise InvalidName(f"{what} {name!r} contains a NUL byte")
    if "/" in name:
        raise InvalidName(f"{what} {name!r} contains '/': a volume is one file in its pool, "
                          "give its name only (use the pool field for the pool)")
    if ".." in name:
        raise InvalidName(f"{what} {name!r} contains '..'")
    if name.startswith("-"):
        raise InvalidName(f"{what} {name!r} starts with '-' (it would read as an option)")
    if name.startswith("."):
        raise InvalidName(f"{what} {name!r} starts with '.': hidden names are the agent's "
                          "temporary files")
    if len(name.encode()) > NAME_MAX:
        raise InvalidName(f"{what} is {len(name.encode())} bytes long; at most {NAME_MAX}")
    if not _NAME_OK.match(name):
        raise InvalidName(f"{what} {name!r} has characters other than letters, digits, "
                          "'.', '_', '+' and '-'")
    return name


def check_pool_name(name: str) -> str:
    if not isinstance(name, str) or not _POOL_OK.match(name):
        raise InvalidName(f"pool name {name!r} is not valid: 1-64 letters, digits, '_' or '-'")
    return name


def check_size(size: int, what: str = "size") -> int:
    if not isinstance(size, int) or size <= 0:
        raise BadRequest(f"{what} must be a positive number of bytes, not {size!r}")
    if size % 512:
        up = (size // 512 + 1) * 512
        raise BadRequest(f"{what} {size} is not a multiple of 512 bytes (disk sectors); "
                         f"use {up}")
    return size



# -- extents -----------------------------------------------------------------------------------


def zero_outside(fd: int, size: int, allowed: list[Extent]) -> bool:
    """True if every byte of ``fd`` outside the sorted ``allowed`` ranges reads as zero."""
    for off, length in data_extents(fd, size):
        end = off + length
        pos = off
        for a_off, a_len in allowed:
            a_end = a_off + a_len
            if a_end <= pos or a_off >= end:
                continue
            if a_off > pos and not _is_zero(fd, pos, a_off - pos):
                return False
            pos = max(pos, a_end)
        if pos < end and not _is_zero(fd, pos, end - pos):
            return False
    return True


def _is_zero(fd: int, off: int, length: int) -> bool:
    while length > 0:
        n = min(length, READ_STEP)
        data = os.pread(fd, n, off)
        if not data or data != ZEROS[: len(data)]:
            return not data
        off += len(data)
        length -= len(data)
    return True


# -- pools -------------------------------------------------------------------------------------


@dataclass
class CloneResult:
    method: CloneMethod
    copied_bytes: int  # data bytes moved (0 for a reflink or rename)
    hole_bytes: int  # virtual bytes never read: holes left as holes
    seconds: float
    volume: VolumeInfo


@dataclass
class OpenVolume:
    """A volume opened read-only for a transfer; the caller closes it."""

    fd: int
    size: int
    stamp: str  # changes when the file does

    def extents(self) -> list[Extent]:
        return data_extents(self.fd, self.size)

    def read(self, off: int, length: int) -> bytes:
        data = os.pread(self.fd, length, off)
        if len(data) != length:
            raise BackendError(f"short read at offset {off}: was the source truncated?")
        return data

    def close(self) -> None:
        os.close(self.fd)


class Pool:
    """One directory pool, held open by a directory descriptor."""

    def __init__(self, name: str, path: str) -> None:
        self.name = check_pool_name(name)
        os.makedirs(path, mode=0o711, exist_ok=True)
        self.path = os.path.realpath(path)
        self.dir_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.reflink = self._probe_reflink()

    def close(self) -> None:
        os.close(self.dir_fd)

    def file_path(self, name: str) -> str:
        return os.path.join(self.path, name)

    def space(self) -> tuple[int, int]:
        """(capacity, free) bytes of the pool's filesystem, as an unprivileged writer sees."""
        st = os.fstatvfs(self.dir_fd)
        return st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize

    def lstat(self, name: str) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=self.dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def open(self, name: str, flags: int, mode: int = 0o600) -> int:
        """Open ``name`` in the pool, never through a symlink, as a regular file."""
        try:
            fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=self.dir_fd)
        except FileNotFoundError:
            raise NotFound(f"pool {self.name!r} has no volume {name!r}") from None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise Forbidden(self._symlink_text(name)) from None
            if e.errno == errno.EEXIST:
                raise Conflict(f"{self.name}/{name} exists already") from None
            raise BackendError(f"cannot open {self.file_path(name)}: {e.strerror}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise Forbidden(f"{self.file_path(name)} is not a regular file; it is not a volume")
        return fd

    def _symlink_text(self, name: str) -> str:
        try:
            target = os.readlink(name, dir_fd=self.dir_fd)
        except OSError:
            target = "?"
        return (f"{self.file_path(name)} is a symlink (to {target}); the agent never follows "
                "links out of a pool: remove it or import the file it points to")

    def fsync_dir(self) -> None:
        os.fsync(self.dir_fd)

    def temp_name(self, kind: str) -> str:
        return f"{TEMP_PREFIX}{kind}-{secrets.token_hex(8)}.part"

    def remove(self, name: str) -> None:
        with suppress(FileNotFoundError):
            os.unlink(name, dir_fd=self.dir_fd)

    def publish(self, temp: str, name: str) -> None:
        """Make the finished ``temp`` visible as ``name``; Conflict if ``name`` appeared."""
        try:
            fileops.publish(temp, name, dir_fd=self.dir_fd)
        except FileExistsError:
            raise Conflict(f"{self.name}/{name} exists already; choose another name") from None

    def _probe_reflink(self) -> bool:
        a, b = self.temp_name("probe"), self.temp_name("probe")
        fa = fb = -1
        try:
            fa = os.open(a, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600,
                         dir_fd=self.dir_fd)
            os.pwrite(fa, b"x" * 4096, 0)
            fb = os.open(b, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600,
                         dir_fd=self.dir_fd)
            return fileops.reflink(fa, fb)
        except OSError:
            return False
        finally:
            for fd, n in ((fa, a), (fb, b)):
                if fd >= 0:
                    os.close(fd)
                    self.remove(n)


def volume_stamp(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


class VolumeStore(Protocol):
    """The volume operations the storage handlers use; ``Pools`` is the real one, and unit
    tests of the handlers pass a small fake instead."""

    @property
    def pools(self) -> Mapping[str, Pool]: ...

    def close(self) -> None: ...

    def pool(self, name: str) -> Pool: ...

    def claim(self, pool: Pool, name: str) -> None: ...

    def release(self, pool: Pool, name: str) -> None: ...

    def pool_info(self, name: str) -> PoolInfo: ...

    def volumes(self, pool_name: str) -> list[VolumeInfo]: ...

    def info(self, pool_name: str, name: str) -> VolumeInfo: ...

    def sha256(self, pool_name: str, name: str, *, progress: Progress | None = None,
               cancel: threading.Event | None = None) -> str: ...

    def create(self, pool_name: str, name: str, size: int, *,
               preallocate: bool = False) -> VolumeInfo: ...

    def resize(self, pool_name: str, name: str, size: int, *,
               preallocate: bool = False) -> VolumeInfo: ...

    def delete(self, pool_name: str, name: str) -> VolumeInfo: ...

    def clone(self, src_pool: str, name: str, dst_pool: str, dst_name: str, *,
              progress: Progress | None = None, cancel: threading.Event | None = None,
              claimed: bool = False) -> CloneResult: ...

    def import_file(self, source: str, pool_name: str, name: str, *, move: bool = False,
                    progress: Progress | None = None, cancel: threading.Event | None = None,
                    claimed: bool = False) -> CloneResult: ...

    def check_importable(self, source: str) -> str: ...


class Pools:
    """Every pool of this host, and the volume operations on them."""

    def __init__(self, paths: dict[str, str], import_dirs: list[str] | None = None) -> None:
        self.pools = {name: Pool(name, path) for name, path in paths.items()}
        self.import_dirs = [os.path.realpath(d) for d in import_dirs or []]
        self._busy: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        for pool in self.pools.values():
            self._sweep(pool)

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()

    def pool(self, name: str) -> Pool:
        check_pool_name(name)
        try:
            return self.pools[name]
        except KeyError:
            raise NotFound(f"no pool {name!r}; pools: {', '.join(sorted(self.pools))}") from None

    def _sweep(self, pool: Pool) -> None:
        """Remove what a crash left behind: temporary files of clones, creates and imports,
        half-written state files, and incoming transfer data without its state file (the
        transfers with one are resumed)."""
        names = set(os.listdir(pool.dir_fd))
        for name in names:
            if not name.startswith(TEMP_PREFIX):
                continue
            xfer = name.startswith(f"{TEMP_PREFIX}xfer-")
            if name.endswith(".new") or (name.endswith(".part") and (
                    not xfer or name.removesuffix(".part") + ".json" not in names)):
                pool.remove(name)

    def claim(self, pool: Pool, name: str) -> None:
        """Hold the new volume name ``name`` for one creator at a time; Conflict for others."""
        key = (pool.name, check_name(name))
        with self._lock:
            if key in self._busy:
                raise Conflict(f"{pool.name}/{name} is being created by another request "
                               "(a clone, import or transfer); wait for it or pick another name")
            if pool.lstat(name) is not None:
                raise Conflict(f"{pool.name}/{name} exists already; delete it or pick another "
                               "name")
            self._busy.add(key)

    def release(self, pool: Pool, name: str) -> None:
        with self._lock:
            self._busy.discard((pool.name, name))

    @contextmanager
    def reserve(self, pool: Pool, name: str, *, claimed: bool = False) -> Iterator[None]:
        """Hold ``name`` while creating it (unless the caller already does)."""
        if claimed:
            yield
            return
        self.claim(pool, name)
        try:
            yield
        finally:
            self.release(pool, name)

    # -- reading -----------------------------------------------------------------------------

    def pool_info(self, name: str) -> PoolInfo:
        pool = self.pool(name)
        capacity, free = pool.space()
        vols = self.volumes(name)
        return PoolInfo(name=pool.name, path=pool.path, capacity_bytes=capacity, free_bytes=free,
                        allocated_bytes=sum(v.allocated_bytes for v in vols),
                        virtual_bytes=sum(v.virtual_bytes for v in vols), volumes=len(vols),
                        reflink=pool.reflink)

    def rooms(self) -> dict[str, PoolRoom]:
        """Every pool's free space now, for the heartbeat (placement reads it from there)."""
        out = {}
        for name, pool in self.pools.items():
            try:
                free = pool.space()[1]
            except OSError:  # the pool's filesystem went away: no room for a new disk
                free = 0
            out[name] = PoolRoom(path=pool.path, reflink=pool.reflink, free_bytes=free)
        return out

    def volumes(self, pool_name: str) -> list[VolumeInfo]:
        """Regular files of the pool with valid names; links, temporaries and files with names
        the agent would refuse are not volumes."""
        pool = self.pool(pool_name)
        out = []
        for entry in os.scandir(pool.dir_fd):
            if not _NAME_OK.match(entry.name) or ".." in entry.name or \
                    len(entry.name.encode()) > NAME_MAX or \
                    not entry.is_file(follow_symlinks=False):
                continue
            st = entry.stat(follow_symlinks=False)
            out.append(self._info(pool, entry.name, st))
        return sorted(out, key=lambda v: v.name)

    def _info(self, pool: Pool, name: str, st: os.stat_result) -> VolumeInfo:
        return VolumeInfo(pool=pool.name, name=name, path=pool.file_path(name),
                          virtual_bytes=st.st_size, allocated_bytes=st.st_blocks * 512,
                          modified=st.st_mtime)

    def stat(self, pool_name: str, name: str) -> tuple[Pool, os.stat_result]:
        pool = self.pool(pool_name)
        check_name(name)
        st = pool.lstat(name)
        if st is None:
            raise NotFound(f"pool {pool.name!r} has no volume {name!r}")
        if stat.S_ISLNK(st.st_mode):
            raise Forbidden(pool._symlink_text(name))
        if not stat.S_ISREG(st.st_mode):
            raise Forbidden(f"{pool.file_path(name)} is not a regular file; it is not a volume")
        return pool, st

    def info(self, pool_name: str, name: str) -> VolumeInfo:
        pool, st = self.stat(pool_name, name)
        return self._info(pool, name, st)

    def path_of(self, pool_name: str, name: str) -> str:
        return self.pool(pool_name).file_path(check_name(name))

    def sha256(self, pool_name: str, name: str, *, progress: Progress | None = None,
               cancel: threading.Event | None = None) -> str:
        """sha256 of the volume's content, holes read as zeros without touching the disk."""
        pool = self.pool(pool_name)
        fd = pool.open(check_name(name), os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            pieces = [(off, n, off) for off, n in data_extents(fd, size)]
            return sha256_pieces(fd, size, pieces, what=pool.file_path(name), progress=progress,
                                 cancel=cancel)
        finally:
            os.close(fd)

    def open_for_reading(self, pool_name: str, name: str) -> OpenVolume:
        pool = self.pool(pool_name)
        fd = pool.open(check_name(name), os.O_RDONLY)
        st = os.fstat(fd)
        return OpenVolume(fd=fd, size=st.st_size, stamp=volume_stamp(st))

    # -- writing -----------------------------------------------------------------------------

    def need(self, pool: Pool, needed: int, what: str) -> None:
        """Refuse work that would write more than the pool has free."""
        capacity, free = pool.space()
        if needed > free:
            raise InsufficientResources(
                f"pool {pool.name!r} has {human_bytes(free)} free, {what} needs "
                f"{human_bytes(needed)}; free some space or use another pool")

    def create(self, pool_name: str, name: str, size: int, *,
               preallocate: bool = False) -> VolumeInfo:
        pool = self.pool(pool_name)
        check_name(name)
        check_size(size)
        capacity, _ = pool.space()
        if size > capacity:
            raise InsufficientResources(
                f"a volume of {human_bytes(size)} is beyond pool {pool.name!r}, whose "
                f"filesystem holds {human_bytes(capacity)} in all; use a smaller size or a "
                "bigger pool")
        if preallocate:
            self.need(pool, size, f"preallocating {name}")
        with self.reserve(pool, name):
            temp = pool.temp_name("create")
            fd = pool.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL)
            try:
                os.ftruncate(fd, size)
                if preallocate:
                    os.posix_fallocate(fd, 0, size)
                os.fsync(fd)
                os.close(fd)
                fd = -1
                pool.publish(temp, name)
            except OSError as e:
                raise _os_error(e, pool, f"creating {name}") from None
            finally:
                if fd >= 0:
                    os.close(fd)
                pool.remove(temp)
        return self.info(pool.name, name)

    def resize(self, pool_name: str, name: str, size: int, *,
               preallocate: bool = False) -> VolumeInfo:
        pool, st = self.stat(pool_name, name)
        check_size(size)
        if size < st.st_size:
            raise BadRequest(f"{pool.name}/{name} is {st.st_size} bytes; shrinking to {size} "
                             "would cut off data, so only growing is supported")
        capacity, _ = pool.space()
        if size > capacity:
            raise InsufficientResources(
                f"{human_bytes(size)} is beyond pool {pool.name!r}, whose filesystem "
                f"holds {human_bytes(capacity)} in all")
        if preallocate:
            self.need(pool, size - st.st_size, f"preallocating the growth of {name}")
        fd = pool.open(name, os.O_RDWR)
        try:
            if size > st.st_size:
                os.ftruncate(fd, size)
                if preallocate:
                    os.posix_fallocate(fd, st.st_size, size - st.st_size)
                os.fsync(fd)
        except OSError as e:
            raise _os_error(e, pool, f"resizing {name}") from None
        finally:
            os.close(fd)
        return self.info(pool.name, name)

    def delete(self, pool_name: str, name: str) -> VolumeInfo:
        pool, st = self.stat(pool_name, name)
        info = self._info(pool, name, st)
        os.unlink(name, dir_fd=pool.dir_fd)
        pool.fsync_dir()
        return info

    def clone(self, src_pool: str, name: str, dst_pool: str, dst_name: str, *,
              progress: Progress | None = None, cancel: threading.Event | None = None,
              claimed: bool = False) -> CloneResult:
        """Copy a volume: FICLONE when one filesystem can share the blocks, else a sparse copy.

        The copy is fsynced under a temporary name and linked into place at the end; a
        failure or cancel removes it, so no half volume is ever visible. ``claimed``: the
        caller holds ``dst_name`` (see ``claim``) and releases it.
        """
        spool = self.pool(src_pool)
        src_fd = spool.open(check_name(name), os.O_RDONLY)
        try:
            dpool = self.pool(dst_pool)
            if (spool.name, name) == (dpool.name, dst_name):
                raise BadRequest("a volume cannot be cloned onto itself; give another name")
            return self._copy_in(src_fd, f"{spool.name}/{name}", dpool, dst_name,
                                 progress=progress, cancel=cancel, claimed=claimed)
        finally:
            os.close(src_fd)

    def import_file(self, source: str, pool_name: str, name: str, *, move: bool = False,
                    progress: Progress | None = None, cancel: threading.Event | None = None,
                    claimed: bool = False) -> CloneResult:
        """Adopt a RAW file from an import directory; other image formats are refused."""
        pool = self.pool(pool_name)
        check_name(name)
        real = self.check_importable(source)
        try:
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            raise NotFound(f"cannot open {source}: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise BadRequest(f"{source} is not a regular file")
            head = os.pread(fd, HEAD_BYTES, 0)
            tail = os.pread(fd, TAIL_BYTES, max(0, st.st_size - TAIL_BYTES))
            fmt = disk_format(head, tail)
            if fmt is not None:
                raise BadRequest(conversion_hint(fmt, source) + ", then import the .raw file")
            check_size(st.st_size, f"{source}'s size")
            if move and st.st_dev == os.fstat(pool.dir_fd).st_dev:
                return self._move_in(real, st, pool, name, claimed=claimed)
            return self._copy_in(fd, source, pool, name, progress=progress, cancel=cancel,
                                 claimed=claimed)
        finally:
            os.close(fd)

    def check_importable(self, source: str) -> str:
        """The real path of ``source`` if it may be imported (inside an import directory)."""
        if not os.path.isabs(source):
            raise BadRequest(f"import source {source!r} must be an absolute path")
        real = os.path.realpath(source)
        if real != os.path.normpath(source):
            raise Forbidden(f"import source {source} goes through a symlink (to {real}); give "
                            "the real path")
        if not any(real.startswith(d.rstrip("/") + "/") for d in self.import_dirs):
            dirs = ", ".join(self.import_dirs) or "(none configured)"
            raise Forbidden(f"{source} is outside the import directories ({dirs}); move the "
                            "file there first, or configure [storage] import_dirs")
        return real

    def _move_in(self, real: str, st: os.stat_result, pool: Pool, name: str, *,
                 claimed: bool) -> CloneResult:
        started = time.monotonic()
        with self.reserve(pool, name, claimed=claimed):
            temp = pool.temp_name("import")
            os.rename(real, os.path.join(pool.path, temp))
            try:
                pool.publish(temp, name)
            except Conflict:
                os.rename(os.path.join(pool.path, temp), real)
                raise
        return CloneResult(method="rename", copied_bytes=0, hole_bytes=0,
                           seconds=time.monotonic() - started,
                           volume=self._info(pool, name, st))

    def _copy_in(self, src_fd: int, src_label: str, pool: Pool, name: str, *,
                 progress: Progress | None, cancel: threading.Event | None,
                 claimed: bool) -> CloneResult:
        started = time.monotonic()
        st = os.fstat(src_fd)
        with self.reserve(pool, name, claimed=claimed):
            temp = pool.temp_name("clone")
            fd = pool.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL)
            try:
                method: CloneMethod = "reflink"
                copied = holes = 0
                if fileops.reflink(src_fd, fd):
                    if progress:
                        progress(st.st_size, st.st_size)
                else:
                    method = "copy"
                    self.need(pool, st.st_blocks * 512, f"cloning {src_label}")
                    copied, holes = fileops.copy_sparse(src_fd, fd, progress=progress,
                                                        cancel=cancel)
                os.fsync(fd)
                os.close(fd)
                fd = -1
                pool.publish(temp, name)
            except OSError as e:
                raise _os_error(e, pool, f"cloning {src_label} to {name}") from None
            finally:
                if fd >= 0:
                    os.close(fd)
                pool.remove(temp)
        return CloneResult(method=method, copied_bytes=copied, hole_bytes=holes,
                           seconds=time.monotonic() - started, volume=self.info(pool.name, name))

    # -- incoming transfers: temp files kept across restarts ---------------------------------

    def transfer_paths(self, pool_name: str, transfer_id: str) -> tuple[Pool, str, str]:
        """(pool, data temp name, state file name) of an incoming transfer."""
        pool = self.pool(pool_name)
        stem = f"{TEMP_PREFIX}xfer-{transfer_id}"
        return pool, f"{stem}.part", f"{stem}.json"

    def transfer_states(self) -> Iterator[tuple[Pool, str]]:
        """(pool, state file name) of every incoming transfer found on disk."""
        for pool in self.pools.values():
            for entry in os.scandir(pool.dir_fd):
                if entry.name.startswith(f"{TEMP_PREFIX}xfer-") and entry.name.endswith(".json"):
                    yield pool, entry.name

    def open_partial(self, pool: Pool, temp: str, size: int) -> tuple[int, int, bool]:
        """The read-write descriptor of an incoming transfer's temporary file of ``size``
        bytes, its O_DIRECT one for ``write_partial`` (-1 where the filesystem has none),
        and whether the file was made now (sparse, empty) rather than found from before."""
        try:
            fd = pool.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL)
            made = True
        except Conflict:
            fd = pool.open(temp, os.O_RDWR)
            made = False
        try:
            if made or os.fstat(fd).st_size != size:
                os.ftruncate(fd, size)
            direct = fileops.open_direct(temp, dir_fd=pool.dir_fd)
        except OSError as e:
            os.close(fd)
            raise _os_error(e, pool, f"making room for an incoming volume of "
                            f"{human_bytes(size)}", "nothing was kept") from None
        return fd, direct, made

    def write_partial(self, pool: Pool, fd: int, direct: int, off: int, data: bytes,
                      name: str) -> None:
        """Write received ``data`` at ``off`` of an incoming transfer's temporary file (open
        as ``fd`` and, past the page cache, as ``direct``)."""
        try:
            fileops.write_direct(direct, fd, data, off)
        except OSError as e:
            raise _os_error(e, pool, f"receiving {name}", "the transfer was rolled back") \
                from None

    def sync_partial(self, fd: int) -> None:
        """Make what was written to an incoming transfer's temporary file durable."""
        os.fdatasync(fd)

    def read_small(self, pool: Pool, name: str) -> bytes:
        fd = pool.open(name, os.O_RDONLY)
        try:
            return os.read(fd, 64 << 20)
        finally:
            os.close(fd)

    def write_atomic(self, pool: Pool, name: str, data: bytes) -> None:
        """Replace the small file ``name`` with ``data``, durably (``name.new`` meanwhile)."""
        try:
            fileops.write_atomic(name, data, dir_fd=pool.dir_fd)
        except OSError as e:
            raise _os_error(e, pool, f"writing {name}", "its previous content stays") from None


def _os_error(e: OSError, pool: Pool, doing: str,
              outcome: str = "nothing was left behind") -> PhyError:
    """The PhyError for an OSError while ``doing`` something in ``pool``."""
    return fileops.os_error(e, f"pool {pool.name!r}", doing, outcome)
