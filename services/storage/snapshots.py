"""Snapshots in the pools: frozen copies of an owner's volumes (reflink where the pool's
filesystem shares blocks, else a sparse copy) with small files, and their backup archives.

An owner is whoever asked (the vm agent: a VM's uuid). A snapshot lives beside the volumes it
copies, so it counts against their pool's room and a reflink stays possible::

    <pool>/.snapshots/<owner>/<name>/snapshot.json   the SnapshotInfo (in the owner's pool)
    <pool>/.snapshots/<owner>/<name>/files/<file>    small files (UEFI variables, TPM state)
    <pool>/.snapshots/<owner>/<name>/disks/<volume>  the copy of <pool>/<volume>

Every change is crash-safe. A snapshot is built in ``.<name>.part-<hex>`` folders, fsynced,
and renamed into place, the owner's pool last (its ``snapshot.json`` makes it exist); a
delete renames it away first. Putting copies back over volumes (a revert) first makes each
copy under a temporary name beside its volume (``.restore-<hex>.pending``), then writes the
list of renames (``.snapshots/<owner>/.restore.json``), renames, and removes the list: after a
crash, ``sweep`` finishes a list it finds and removes everything half made. A snapshot
labelled ``temporary=yes`` (one a backup or a restore takes for itself) is removed by
``sweep`` too: the job that took it died with the agent::

    snaps = Snapshots(pools)
    info = snaps.take("default", uuid, "before-upgrade", [VolumeRef(name="web-disk0")],
                      {"nvram": b"..."}, {})
    snaps.restore("default", uuid, "before-upgrade")          # the volumes are as they were
    path = snaps.export("default", uuid, "before-upgrade", "/backups", "web-", host="h1")
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import os
import re
import secrets
import shutil
import stat
import threading
import time
from collections.abc import Iterator

import msgspec

from services.storage import archive
from services.storage.volumes import Pool, Pools, Progress, check_name
from shared import fileops
from shared.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    InsufficientResources,
    NotFound,
)
from shared.fileops import human_bytes
from shared.messages.storage import (
    TEMPORARY,
    SnapshotDisk,
    SnapshotInfo,
    SnapshotMethod,
    VolumeInfo,
    VolumeRef,
)

TOP = ".snapshots"
META = "snapshot.json"
JOURNAL = ".restore.json"
MAX_FILES = 16
_STAMP = re.compile(r"^\d{8}T\d{6}\.\d{3}Z$")  # archives: <prefix><UTC time, ms>.phybak
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class _Journal(msgspec.Struct, frozen=True):
    renames: list[tuple[str, str, str]]  # (pool, temporary name, volume)


def _open_dir(parent: int, name: str, *, create: bool = False) -> int:
    """A directory below ``parent`` (made 0700 when ``create``), never through a symlink."""
    if create:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o700, dir_fd=parent)
    try:
        return os.open(name, _DIR, dir_fd=parent)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise Forbidden(f"{name} in a snapshot folder is not a folder (a symlink?); "
                            "the agent never follows links: remove it") from None
        raise


def _rmtree(parent: int, name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(name, dir_fd=parent)


def _write_file(parent: int, name: str, data: bytes) -> None:
    fd = os.open(name, _NEW, 0o600, dir_fd=parent)
    try:
        fileops.write_at(fd, data, 0)
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_file(parent: int, name: str, limit: int) -> bytes:
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
    try:
        return os.read(fd, limit)
    finally:
        os.close(fd)


def _allocated(fd: int) -> int:
    return os.fstat(fd).st_blocks * 512


class _Folders:
    """The open folders of one snapshot operation; closed together at the end."""

    def __init__(self) -> None:
        self.fds: list[int] = []

    def keep(self, fd: int) -> int:
        self.fds.append(fd)
        return fd

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


class Snapshots:
    """The snapshots of every pool of ``pools``; see the module docstring."""

    def __init__(self, pools: Pools) -> None:
        self.pools = pools
        self._busy: set[str] = set()
        self._lock = threading.Lock()
        self.sweep()

    @contextlib.contextmanager
    def _owner_busy(self, owner: str, doing: str) -> Iterator[None]:
        """One change per owner at a time: a second one is refused, not queued."""
        with self._lock:
            if owner in self._busy:
                raise Conflict(f"another snapshot operation of {owner} is running; try again "
                               f"when it is done (wanted: {doing})")
            self._busy.add(owner)
        try:
            yield
        finally:
            with self._lock:
                self._busy.discard(owner)

    def _owner_dir(self, pool: Pool, owner: str, folders: _Folders, *,
                   create: bool = False) -> int | None:
        """``<pool>/.snapshots/<owner>`` open, or None when it does not exist."""
        try:
            top = folders.keep(_open_dir(pool.dir_fd, TOP, create=create))
            return folders.keep(_open_dir(top, owner, create=create))
        except FileNotFoundError:
            return None

    # -- reading -----------------------------------------------------------------------------

    def _meta(self, owner_fd: int, name: str) -> SnapshotInfo | None:
        try:
            snap = _open_dir(owner_fd, name)
        except (FileNotFoundError, Forbidden):
            return None
        try:
            return msgspec.json.decode(_read_file(snap, META, 1 << 20), type=SnapshotInfo)
        except (FileNotFoundError, msgspec.DecodeError):
            return None
        finally:
            os.close(snap)

    def find(self, pool: str = "", owner: str = "") -> list[SnapshotInfo]:
        """Snapshots whose record is in ``pool`` (or any), of ``owner`` (or any), oldest first."""
        pools = [self.pools.pool(pool)] if pool else list(self.pools.pools.values())
        if owner:
            check_name(owner, "owner")
        out: list[SnapshotInfo] = []
        for p in pools:
            folders = _Folders()
            try:
                try:
                    top = folders.keep(_open_dir(p.dir_fd, TOP))
                except FileNotFoundError:
                    continue
                owners = [owner] if owner else [o for o in os.listdir(top)
                                                 if not o.startswith(".")]
                for o in owners:
                    try:
                        ofd = folders.keep(_open_dir(top, o))
                    except FileNotFoundError:
                        continue
                    for entry in sorted(os.listdir(ofd)):
                        info = None if entry.startswith(".") else self._meta(ofd, entry)
                        if info is not None and info.pool == p.name:
                            out.append(info)
            finally:
                folders.close()
        return sorted(out, key=lambda i: (i.created, i.name))

    def get(self, pool: str, owner: str, name: str) -> SnapshotInfo:
        check_name(owner, "owner")
        check_name(name, "snapshot name")
        p = self.pools.pool(pool)
        folders = _Folders()
        try:
            ofd = self._owner_dir(p, owner, folders)
            info = None if ofd is None else self._meta(ofd, name)
        finally:
            folders.close()
        if info is None:
            raise NotFound(f"pool {p.name!r} has no snapshot {name!r} of {owner}")
        return info

    def read(self, pool: str, owner: str, name: str) -> tuple[SnapshotInfo, dict[str, bytes]]:
        """The snapshot and its small files."""
        info = self.get(pool, owner, name)
        p = self.pools.pool(pool)
        folders = _Folders()
        try:
            ofd = self._owner_dir(p, owner, folders)
            assert ofd is not None
            fdir = folders.keep(_open_dir(folders.keep(_open_dir(ofd, name)), "files"))
            return info, {f: _read_file(fdir, f, archive.MAX_FILE_BYTES) for f in info.files}
        except FileNotFoundError:
            raise NotFound(f"snapshot {name!r} of {owner} lost its files; delete it") from None
        finally:
            folders.close()

    def used_bytes(self, pool: str) -> int:
        """What the snapshots in ``pool``'s folder hold on disk (shared blocks included)."""
        total = 0
        for root, _dirs, files in os.walk(os.path.join(self.pools.pool(pool).path, TOP)):
            for f in files:
                with contextlib.suppress(FileNotFoundError):
                    total += os.lstat(os.path.join(root, f)).st_blocks * 512
        return total

    # -- taking ------------------------------------------------------------------------------

    def take(self, pool: str, owner: str, name: str, disks: list[VolumeRef],
             files: dict[str, bytes], labels: dict[str, str]) -> SnapshotInfo:
        """Copy ``disks`` and write ``files`` into a new snapshot, all or nothing."""
        check_name(owner, "owner")
        check_name(name, "snapshot name")
        _check_files(files)
        primary = self.pools.pool(pool)
        if len({(d.pool, d.name) for d in disks}) != len(disks):
            raise BadRequest("a volume is listed twice; each disk is copied once")
        with self._owner_busy(owner, f"taking snapshot {name}"):
            return self._take(primary, owner, name, disks, files, labels)

    def _take(self, primary: Pool, owner: str, name: str, disks: list[VolumeRef],
              files: dict[str, bytes], labels: dict[str, str]) -> SnapshotInfo:
        started = time.monotonic()
        folders = _Folders()
        parts: dict[str, tuple[Pool, int, str, int]] = {}  # pool -> (pool, owner fd, part, fd)
        published: list[tuple[int, str]] = []

        def part(p: Pool) -> tuple[int, int]:
            if p.name not in parts:
                ofd = self._owner_dir(p, owner, folders, create=True)
                assert ofd is not None
                if self._exists(ofd, name):
                    raise Conflict(f"{owner} has a snapshot {name!r} already (pool {p.name!r}); "
                                   "delete it or choose another name")
                tmp = f".{name}.part-{secrets.token_hex(6)}"
                os.mkdir(tmp, 0o700, dir_fd=ofd)
                parts[p.name] = (p, ofd, tmp, folders.keep(_open_dir(ofd, tmp)))
            _, _, _, pfd = parts[p.name]
            return pfd, folders.keep(_open_dir(pfd, "disks", create=True))

        try:
            part(primary)
            copied: list[SnapshotDisk] = []
            for ref in disks:
                p, st = self.pools.stat(ref.pool, ref.name)
                _, dfd = part(p)
                copied.append(self._copy_volume(p, ref.name, st, dfd, name))
            pfd, _ = part(primary)
            fdir = folders.keep(_open_dir(pfd, "files", create=True))
            for fname, data in files.items():
                _write_file(fdir, fname, data)
            info = SnapshotInfo(
                pool=primary.name, owner=owner, name=name, created=time.time(), disks=copied,
                files={f: len(d) for f, d in files.items()}, labels=labels,
                allocated_bytes=sum(d.allocated_bytes for d in copied) + sum(
                    len(d) for d in files.values()),
                seconds=round(time.monotonic() - started, 6))
            _write_file(pfd, META, msgspec.json.encode(info))
            for _p, ofd, tmp, pfd in sorted(parts.values(), key=lambda v: v[0] is primary):
                for sub in ("disks", "files"):
                    with contextlib.suppress(FileNotFoundError):
                        fileops.fsync_path(sub, dir_fd=pfd)
                os.fsync(pfd)
                if self._exists(ofd, name):
                    raise Conflict(f"{owner} has a snapshot {name!r} already")
                os.rename(tmp, name, src_dir_fd=ofd, dst_dir_fd=ofd)
                os.fsync(ofd)
                published.append((ofd, name))
            return info
        except OSError as e:
            raise fileops.os_error(e, f"pool {primary.name!r}", f"taking snapshot {name}",
                                   "nothing was kept") from None
        finally:
            if len(published) != len(parts):  # failed: nothing of it may stay
                for ofd, done in published:
                    _rmtree(ofd, done)
            for _p, ofd, tmp, _fd in parts.values():
                _rmtree(ofd, tmp)
            folders.close()

    @staticmethod
    def _exists(ofd: int, name: str) -> bool:
        try:
            os.stat(name, dir_fd=ofd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return True

    def _copy_volume(self, pool: Pool, volume: str, st: os.stat_result, dfd: int,
                     snap: str) -> SnapshotDisk:
        src = pool.open(volume, os.O_RDONLY)
        try:
            dst = os.open(volume, _NEW, 0o600, dir_fd=dfd)
            try:
                method: SnapshotMethod = "reflink"
                if not fileops.reflink(src, dst):
                    self.pools.need(pool, st.st_blocks * 512,
                                    f"a sparse copy of {volume} for snapshot {snap}")
                    fileops.copy_sparse(src, dst)
                    method = "copy"
                os.fsync(dst)
                return SnapshotDisk(pool=pool.name, volume=volume, virtual_bytes=st.st_size,
                                    allocated_bytes=_allocated(dst), method=method)
            finally:
                os.close(dst)
        finally:
            os.close(src)

    # -- deleting ----------------------------------------------------------------------------

    def delete(self, pool: str, owner: str, name: str = "") -> list[str]:
        """Delete one snapshot, or with ``name`` empty every one of ``owner`` (in every pool:
        copies of other pools' volumes included); returns the names deleted."""
        check_name(owner, "owner")
        p = self.pools.pool(pool)
        with self._owner_busy(owner, f"deleting snapshot {name or '(all)'}"):
            if not name:
                gone = [i.name for i in self.find(p.name, owner)]
                for each in self.pools.pools.values():
                    self._drop_owner(each, owner)
                return gone
            info = self.get(p.name, owner, name)
            for each in sorted(self.pools.pools.values(), key=lambda x: x is not p):
                self._drop(each, owner, info.name)
            return [info.name]

    def _drop(self, pool: Pool, owner: str, name: str) -> None:
        """Rename the snapshot's folder away (it is gone at once), then remove it."""
        folders = _Folders()
        try:
            ofd = self._owner_dir(pool, owner, folders)
            if ofd is None or not self._exists(ofd, name):
                return
            gone = f".{name}.del-{secrets.token_hex(6)}"
            os.rename(name, gone, src_dir_fd=ofd, dst_dir_fd=ofd)
            os.fsync(ofd)
            _rmtree(ofd, gone)
            top = folders.fds[0]
            with contextlib.suppress(OSError):  # not empty: other snapshots of the owner
                os.rmdir(owner, dir_fd=top)
        finally:
            folders.close()

    def _drop_owner(self, pool: Pool, owner: str) -> None:
        try:
            top = _open_dir(pool.dir_fd, TOP)
        except FileNotFoundError:
            return
        try:
            if not self._exists(top, owner):
                return
            gone = f".{owner}.del-{secrets.token_hex(6)}"
            os.rename(owner, gone, src_dir_fd=top, dst_dir_fd=top)
            os.fsync(top)
            _rmtree(top, gone)
        finally:
            os.close(top)

    # -- restoring ---------------------------------------------------------------------------

    def restore(self, pool: str, owner: str, name: str, targets: list[VolumeRef] | None = None,
                *, move: bool = False) -> list[VolumeInfo]:
        """Put the snapshot's copies back over the volumes they came from, or into the new
        volumes ``targets`` (one per disk); see the module docstring for the crash story."""
        with self._owner_busy(owner, f"restoring snapshot {name}"):
            info = self.get(pool, owner, name)
            if targets:
                made = self._into_new(info, targets, move=move)
                if move:
                    for each in self.pools.pools.values():
                        self._drop(each, owner, name)
                return made
            return self._over_volumes(info)

    def _copy_path(self, info: SnapshotInfo, disk: SnapshotDisk,
                   folders: _Folders) -> tuple[Pool, int]:
        """(the pool, the open ``disks`` folder) holding the snapshot's copy of ``disk``."""
        p = self.pools.pool(disk.pool)
        ofd = self._owner_dir(p, info.owner, folders)
        try:
            if ofd is None:
                raise FileNotFoundError
            snap = folders.keep(_open_dir(ofd, info.name))
            dfd = folders.keep(_open_dir(snap, "disks"))
            os.stat(disk.volume, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            raise NotFound(f"snapshot {info.name!r} lost its copy of {disk.pool}/{disk.volume}; "
                           "it cannot be restored: delete it") from None
        return p, dfd

    def _prepare(self, src_dir: int, disk: SnapshotDisk, dst: Pool, kind: str) -> str:
        """A copy of the snapshot's ``disk`` under a temporary name in ``dst``, fsynced."""
        temp = f".{kind}-{secrets.token_hex(8)}.pending"
        src = os.open(disk.volume, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src_dir)
        try:
            out = dst.open(temp, _NEW)
            try:
                if not fileops.reflink(src, out):
                    self.pools.need(dst, os.fstat(src).st_blocks * 512,
                                    f"restoring {disk.volume}")
                    fileops.copy_sparse(src, out)
                os.fchmod(out, 0o600)
                os.fsync(out)
            finally:
                os.close(out)
        except BaseException:
            dst.remove(temp)
            raise
        finally:
            os.close(src)
        return temp

    def _over_volumes(self, info: SnapshotInfo) -> list[VolumeInfo]:
        folders = _Folders()
        prepared: list[tuple[str, str, str]] = []
        try:
            for disk in info.disks:
                p, dfd = self._copy_path(info, disk, folders)
                check_name(disk.volume)
                prepared.append((p.name, self._prepare(dfd, disk, p, "restore"), disk.volume))
            primary = self.pools.pool(info.pool)
            ofd = self._owner_dir(primary, info.owner, folders)
            assert ofd is not None
            fileops.write_atomic(JOURNAL, msgspec.json.encode(_Journal(renames=prepared)),
                                 dir_fd=ofd)
            _replay(self.pools, prepared)
            os.unlink(JOURNAL, dir_fd=ofd)
            os.fsync(ofd)
            prepared.clear()
        except OSError as e:
            raise fileops.os_error(e, f"pool {info.pool!r}", f"restoring snapshot {info.name}",
                                   "the volumes were not changed") from None
        finally:
            for pool, temp, _ in prepared:
                self.pools.pool(pool).remove(temp)
            folders.close()
        return [self.pools.info(d.pool, d.volume) for d in info.disks]

    def _into_new(self, info: SnapshotInfo, targets: list[VolumeRef], *,
                  move: bool) -> list[VolumeInfo]:
        if len(targets) != len(info.disks):
            raise BadRequest(f"snapshot {info.name!r} has {len(info.disks)} disks and "
                             f"{len(targets)} targets were given; give one per disk")
        claimed: list[tuple[Pool, str]] = []
        made: list[tuple[Pool, str]] = []
        folders = _Folders()
        try:
            for t in targets:
                p = self.pools.pool(t.pool)
                self.pools.claim(p, t.name)
                claimed.append((p, t.name))
            for disk, (p, vol) in zip(info.disks, claimed, strict=True):
                src_pool, dfd = self._copy_path(info, disk, folders)
                if move and src_pool is p:
                    os.link(disk.volume, vol, src_dir_fd=dfd, dst_dir_fd=p.dir_fd,
                            follow_symlinks=False)
                    p.fsync_dir()
                else:
                    p.publish(self._prepare(dfd, disk, p, "restore"), vol)
                made.append((p, vol))
            out = [self.pools.info(p.name, vol) for p, vol in made]
            made.clear()
            return out
        except OSError as e:
            raise fileops.os_error(e, f"pool {targets[0].pool!r}",
                                   f"restoring snapshot {info.name}",
                                   "no volume was made") from None
        finally:
            for p, vol in made:
                p.remove(vol)
            for p, vol in claimed:
                self.pools.release(p, vol)
            folders.close()

    # -- archives ----------------------------------------------------------------------------

    def export(self, pool: str, owner: str, name: str, directory: str, prefix: str, *,
               host: str, keep: int = 0, progress: Progress | None = None,
               cancel: threading.Event | None = None) -> dict[str, object]:
        """Write the snapshot as ``<directory>/<prefix><UTC time>.phybak`` (see
        ``archive``); with ``keep``, then remove the oldest archives of ``prefix`` there
        beyond that many. Returns what was written."""
        prefix = _prefix(prefix)
        info, files = self.read(pool, owner, name)
        info = msgspec.structs.replace(info, labels={
            k: v for k, v in info.labels.items() if k != TEMPORARY})
        stamp = datetime.datetime.fromtimestamp(time.time(), datetime.UTC)
        final = f"{prefix}{stamp:%Y%m%dT%H%M%S}.{stamp.microsecond // 1000:03d}Z{archive.SUFFIX}"
        dfd = _backup_dir(directory)
        temp = f".{final}.part-{secrets.token_hex(6)}"
        folders = _Folders()
        started = time.monotonic()
        try:
            disks: list[tuple[archive.Disk, int]] = []
            for i, disk in enumerate(info.disks):
                _p, sdir = self._copy_path(info, disk, folders)
                fd = folders.keep(os.open(disk.volume, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                                          dir_fd=sdir))
                size = os.fstat(fd).st_size
                disks.append((archive.Disk(index=i, size=size,
                                           extents=fileops.data_extents(fd, size)), fd))
            out = os.open(temp, _NEW, 0o600, dir_fd=dfd)
            try:
                with archive.DirectOut(out) as f:
                    data = archive.write(f, archive.Start(created=info.created, host=host,
                                                          snapshot=info),
                                         files, disks, progress=progress, cancel=cancel)
                os.fsync(out)
            finally:
                os.close(out)
            fileops.publish(temp, final, dir_fd=dfd)
            size = os.stat(final, dir_fd=dfd).st_size
            removed = _prune(dfd, prefix, keep) if keep > 0 else []
        except FileExistsError:
            raise Conflict(f"{directory}/{final} exists already; try again in a second") \
                from None
        except OSError as e:
            if e.errno in fileops.NO_SPACE:
                raise InsufficientResources(
                    f"{directory} ran out of space while the backup was written; the partial "
                    "archive was removed: free some space there or back up elsewhere") from None
            raise fileops.os_error(e, directory, f"writing {final}",
                                   "the partial archive was removed") from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp, dir_fd=dfd)
            os.close(dfd)
            folders.close()
        return {"archive": os.path.join(directory, final), "bytes": size, "data_bytes": data,
                "seconds": round(time.monotonic() - started, 6), "removed": removed}

    def import_(self, path: str, pool: str, owner: str, name: str, labels: dict[str, str], *,
                progress: Progress | None = None,
                cancel: threading.Event | None = None) -> SnapshotInfo:
        """Read the archive at ``path`` into a new snapshot in ``pool``: every disk lands
        there, and the snapshot appears only once every sum matched."""
        check_name(owner, "owner")
        check_name(name, "snapshot name")
        p = self.pools.pool(pool)
        src = _archive_file(path)
        with self._owner_busy(owner, f"importing {path}"):
            folders = _Folders()
            tmp = ""
            ofd = -1
            try:
                ofd_or_none = self._owner_dir(p, owner, folders, create=True)
                assert ofd_or_none is not None
                ofd = ofd_or_none
                if self._exists(ofd, name):
                    raise Conflict(f"{owner} has a snapshot {name!r} already")
                tmp = f".{name}.part-{secrets.token_hex(6)}"
                os.mkdir(tmp, 0o700, dir_fd=ofd)
                sink = _ImportSink(self.pools, p, folders.keep(_open_dir(ofd, tmp)), folders)
                fd = folders.keep(os.open(src, os.O_RDONLY | os.O_CLOEXEC))
                with archive.DirectIn(fd) as f:
                    start = archive.read(f, sink, progress=progress, cancel=cancel)
                info = msgspec.structs.replace(
                    start.snapshot, pool=p.name, owner=owner, name=name, disks=sink.disks(),
                    files={f: len(d) for f, d in sink.files.items()},
                    labels={**start.snapshot.labels, **labels})
                _write_file(sink.part, META, msgspec.json.encode(info))
                for sub in ("disks", "files"):
                    fileops.fsync_path(sub, dir_fd=sink.part)
                os.fsync(sink.part)
                os.rename(tmp, name, src_dir_fd=ofd, dst_dir_fd=ofd)
                os.fsync(ofd)
                tmp = ""
                return info
            except OSError as e:
                raise fileops.os_error(e, f"pool {p.name!r}", f"restoring {path}",
                                       "nothing was kept") from None
            finally:
                if tmp:
                    _rmtree(ofd, tmp)
                    with contextlib.suppress(OSError):  # not empty: other snapshots of owner
                        os.rmdir(owner, dir_fd=folders.fds[0])
                folders.close()

    # -- after a crash -----------------------------------------------------------------------

    def sweep(self) -> None:
        """Finish the restores whose rename lists exist, then remove what is half made
        (parts, deletions, prepared copies, copies whose snapshot record is gone) and the
        temporary snapshots."""
        found: list[tuple[Pool, str, str]] = []  # (pool, owner, name) of every folder
        for p in self.pools.pools.values():
            try:
                top = _open_dir(p.dir_fd, TOP)
            except FileNotFoundError:
                continue
            try:
                for owner in os.listdir(top):
                    if owner.startswith("."):
                        _rmtree(top, owner)
                        continue
                    ofd = _open_dir(top, owner)
                    try:
                        with contextlib.suppress(FileNotFoundError):
                            journal = msgspec.json.decode(_read_file(ofd, JOURNAL, 1 << 20),
                                                          type=_Journal)
                            _replay(self.pools, journal.renames)
                            os.unlink(JOURNAL, dir_fd=ofd)
                        for entry in os.listdir(ofd):
                            if entry.startswith("."):
                                _rmtree(ofd, entry)
                            else:
                                found.append((p, owner, entry))
                    finally:
                        os.close(ofd)
            finally:
                os.close(top)
        records = {(p.name, o, n): self._record(p, o, n) for p, o, n in found}
        owned = {(o, n): i for (_, o, n), i in records.items() if i is not None}
        for p, owner, entry in found:
            info = owned.get((owner, entry))
            if info is None or info.labels.get(TEMPORARY) == "yes":
                self._drop(p, owner, entry)
        for p in self.pools.pools.values():
            for entry in os.listdir(p.dir_fd):
                if entry.startswith(".restore-") and entry.endswith(".pending"):
                    p.remove(entry)

    def _record(self, pool: Pool, owner: str, name: str) -> SnapshotInfo | None:
        folders = _Folders()
        try:
            ofd = self._owner_dir(pool, owner, folders)
            return None if ofd is None else self._meta(ofd, name)
        finally:
            folders.close()


class _ImportSink:
    """Where ``archive.read`` puts an archive: files and disks in a snapshot's part folder."""

    def __init__(self, pools: Pools, pool: Pool, part: int, folders: _Folders) -> None:
        self.pools, self.pool, self.part, self.folders = pools, pool, part, folders
        self.files: dict[str, bytes] = {}
        self.fdir = folders.keep(_open_dir(part, "files", create=True))
        self.ddir = folders.keep(_open_dir(part, "disks", create=True))
        self.made: dict[int, SnapshotDisk] = {}
        self.fds: list[int] = []  # the disks' files, fsynced once all is read
        self.start: archive.Start | None = None

    def begin(self, start: archive.Start) -> None:
        self.start = start

    def file(self, name: str, data: bytes) -> None:
        check_name(name, "file name in the archive")
        if len(self.files) >= MAX_FILES:
            raise BadRequest(f"the archive has more than {MAX_FILES} files")
        _write_file(self.fdir, name, data)
        self.files[name] = data

    def disk(self, disk: archive.Disk) -> int:
        assert self.start is not None
        source = self.start.snapshot.disks[disk.index]
        check_name(source.volume, "volume name in the archive")
        capacity, _ = self.pool.space()
        if disk.size > capacity:
            raise InsufficientResources(
                f"disk {source.volume} of {human_bytes(disk.size)} is beyond pool "
                f"{self.pool.name!r}, which holds {human_bytes(capacity)}; restore into a "
                "bigger pool")
        self.pools.need(self.pool, disk.data_bytes, f"restoring {source.volume}")
        taken = {d.volume for d in self.made.values()}
        volume = source.volume if source.volume not in taken else f"{source.volume}-{disk.index}"
        fd = self.folders.keep(os.open(volume, _NEW, 0o600, dir_fd=self.ddir))
        self.fds.append(fd)
        os.ftruncate(fd, disk.size)
        self.made[disk.index] = msgspec.structs.replace(
            source, pool=self.pool.name, volume=volume, virtual_bytes=disk.size,
            allocated_bytes=disk.data_bytes)
        return fd

    def disks(self) -> list[SnapshotDisk]:
        assert self.start is not None
        if len(self.made) != len(self.start.snapshot.disks):
            raise BadRequest(f"the archive holds {len(self.made)} of the "
                             f"{len(self.start.snapshot.disks)} disks it lists")
        for fd in self.fds:
            os.fsync(fd)
        return [self.made[i] for i in sorted(self.made)]


def _replay(pools: Pools, renames: list[tuple[str, str, str]]) -> None:
    """Rename each prepared copy over its volume; a copy already renamed is skipped, so a
    list is replayed after a crash as often as needed."""
    for pool_name, temp, volume in renames:
        pool = pools.pool(pool_name)
        if pool.lstat(temp) is None:
            continue
        os.rename(temp, volume, src_dir_fd=pool.dir_fd, dst_dir_fd=pool.dir_fd)
        pool.fsync_dir()


def _check_files(files: dict[str, bytes]) -> None:
    if len(files) > MAX_FILES:
        raise BadRequest(f"{len(files)} files; a snapshot keeps at most {MAX_FILES}")
    for fname, data in files.items():
        check_name(fname, "file name")
        if len(data) > archive.MAX_FILE_BYTES:
            raise BadRequest(f"file {fname!r} has {len(data)} bytes; at most "
                             f"{archive.MAX_FILE_BYTES}")


def _prefix(prefix: str) -> str:
    if prefix and (prefix.startswith(("-", ".")) or not re.fullmatch(r"[A-Za-z0-9_.+-]+",
                                                                     prefix)):
        raise BadRequest(f"archive prefix {prefix!r}: letters, digits, '.', '_', '+', '-'")
    return prefix


def _backup_dir(directory: str) -> int:
    """The open backup directory; refused unless it is an absolute path to a directory."""
    if not isinstance(directory, str) or not directory.startswith("/") or "\x00" in directory:
        raise BadRequest(f"backup directory {directory!r} must be an absolute path")
    try:
        return os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound(f"backup directory {directory} does not exist; create it first") \
            from None
    except NotADirectoryError:
        raise BadRequest(f"{directory} is not a directory") from None
    except OSError as e:
        raise BadRequest(f"backup directory {directory}: {e.strerror}") from None


def _archive_file(path: str) -> str:
    if not isinstance(path, str) or not path.startswith("/") or "\x00" in path:
        raise BadRequest(f"archive {path!r} must be an absolute path on this host")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise NotFound(f"no archive {path} on this host (the vm agent of the host you "
                       "restore on reads it)") from None
    if not stat.S_ISREG(st.st_mode):
        raise BadRequest(f"{path} is not a regular file")
    return path


def _prune(dfd: int, prefix: str, keep: int) -> list[str]:
    """Remove the oldest archives ``<prefix><UTC time>.phybak`` beyond the newest ``keep``."""
    mine = sorted(e for e in os.listdir(dfd)
                  if e.startswith(prefix) and e.endswith(archive.SUFFIX)
                  and _STAMP.match(e[len(prefix):-len(archive.SUFFIX)]))
    old = mine[: max(0, len(mine) - keep)]
    for e in old:
        os.unlink(e, dir_fd=dfd)
    if old:
        os.fsync(dfd)
    return old
