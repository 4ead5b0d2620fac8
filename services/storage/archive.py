"""The backup archive format (``.phybak``): one snapshot (disks with their holes, small files,
what the snapshot was) in one zstd stream, with a sha256 of every member.

A Phyllome backup archive is a zstd stream (frames with content checksums) of::

    b"PHYLLOME-BACKUP\\n"                        16 bytes of magic
    member, member, ...                          each: a 4-byte big-endian length, that many
                                                 bytes of JSON header, then the payload

The headers are tagged JSON (``type``):

- ``start`` (first, no payload): ``format`` (1), ``created``, ``host``, and the snapshot's
  ``SnapshotInfo`` (owner, name, labels, its disks' pools and volumes in order);
- ``file``: ``name``, ``size``; the payload is the file (the VM's spec, UEFI variables, TPM
  state: at most ``MAX_FILE_BYTES`` each);
- ``disk``: ``index`` (into the snapshot's disks), ``size`` (virtual bytes) and ``extents``
  (sorted ``[offset, length]`` pairs where the disk holds data); the payload is those
  extents' bytes back to back, so holes cost nothing and come back as holes;
- ``end`` (last, no payload): ``sha256``, the sum of every other member's bytes as stored
  (length, header and payload), by ``start``, ``file:<name>`` and ``disk:<index>``.

A reader refuses a newer ``format`` at the first member, before it writes anything, and takes
nothing as restored until ``end`` has matched every sum; a writer writes to a temporary name
and renames when complete, so a cut-short archive never looks finished::

    with open(tmp, "wb") as f:
        write(f, Start(created=t, host="h1", snapshot=info), {"vm.json": spec},
              [(Disk(index=0, size=size, extents=data_extents(fd, size)), fd)])
    with open(tmp, "rb") as f:
        start = read(f, sink)          # sink.file(...), sink.disk(...) -> fd to write into

The same tools unpack it by hand: ``zstd -dc x.phybak`` gives the stream above.

Big data goes past the page cache (O_DIRECT, in ``STEP`` buffers, where the filesystem has
it): the disks read for a backup, the archive written (``DirectOut``) and read back
(``DirectIn``), the restored disks. Each byte is used once, and on a 2-core host the page
cache's copies and write-back cost more CPU than hashing it (measured: about 2 s per GiB of
buffered writes against 0.03 s with O_DIRECT); reading, hashing, (de)compressing and writing
run in their own threads, since zstd, hashlib and the system calls let go of the GIL::

    with DirectOut(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)) as out:
        write(out, start, files, disks)                # then fsync, rename
    with DirectIn(os.open(path, os.O_RDONLY)) as src:
        read(src, sink)
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import queue
import threading
from collections.abc import Callable, Generator
from typing import IO, Protocol, cast

import msgspec
import zstandard

from shared import fileops
from shared.errors import BadRequest, Cancelled, PayloadTooLarge
from shared.messages.storage import Extent, SnapshotInfo

MAGIC = b"PHYLLOME-BACKUP\n"
FORMAT = 1
SUFFIX = ".phybak"
LEVEL = 3  # zstd's own default: the comparison a user would run
MAX_HEADER_BYTES = 4 << 20  # a disk's extent list: 250,000 extents fit
MAX_FILE_BYTES = 8 << 20  # UEFI variables and TPM state are a few MiB at most
MAX_MEMBERS = 256
STEP = 8 << 20  # bytes per read and write of disk data (a multiple of ALIGN)
BUFFERS = 6  # STEP buffers of disk data in flight (a backup's reads run ahead of the
# hashing and of zstd, a restore's decompression ahead of the hashing and the writes)
FILE_BUFFERS = 3  # of the archive file: one filled (or read), one written, one spare
OUT_STEP = 1 << 20  # compressed bytes zstd hands on at a time
ALIGN = fileops.DIRECT_ALIGN

Progress = Callable[[int, int], None]


class Start(msgspec.Struct, frozen=True, kw_only=True, tag="start"):
    format: int = FORMAT
    created: float
    host: str
    snapshot: SnapshotInfo


class File(msgspec.Struct, frozen=True, kw_only=True, tag="file"):
    name: str
    size: int


class Disk(msgspec.Struct, frozen=True, kw_only=True, tag="disk"):
    index: int
    size: int
    extents: list[Extent]

    @property
    def data_bytes(self) -> int:
        return sum(n for _, n in self.extents)


class End(msgspec.Struct, frozen=True, kw_only=True, tag="end"):
    sha256: dict[str, str]


class _Version(msgspec.Struct, kw_only=True):
    """What any format's first header has: read before the rest, so a newer archive is
    refused with the right words rather than a decoding error."""

    type: str = ""
    format: int = 0


_decode = msgspec.json.Decoder(Start | File | Disk | End)
_encode = msgspec.json.Encoder()


def key(member: Start | File | Disk) -> str:
    """The member's name in ``End.sha256``."""
    if isinstance(member, File):
        return f"file:{member.name}"
    if isinstance(member, Disk):
        return f"disk:{member.index}"
    return "start"


# -- writing -----------------------------------------------------------------------------------


def write(out: DirectOut | IO[bytes], start: Start, files: dict[str, bytes],
          disks: list[tuple[Disk, int]], *, progress: Progress | None = None,
          cancel: threading.Event | None = None, level: int = LEVEL) -> int:
    """Write the archive of ``start``'s snapshot to ``out``; returns the data bytes read.

    ``disks`` pairs each disk's header (its extents already found) with a descriptor to read
    it from. A thread reads the disks into ``STEP`` buffers (O_DIRECT where the filesystem
    has it); each buffer goes at once to a hashing thread and to zstd, which compresses in
    this thread (one compressing thread, as the ``zstd`` command has) straight into
    ``out``'s buffers; zstd and hashlib let go of the GIL. ``out`` is best a ``DirectOut``,
    which writes past the page cache from a thread of its own; any other file is written a
    buffer at a time.
    """
    sink = out if isinstance(out, DirectOut) else _Copying(out)
    z = zstandard.ZstdCompressor(level=level, write_checksum=True, threads=0)
    with _DiskStream(start, files, disks, progress, cancel) as stream:
        reader = z.stream_reader(cast(IO[bytes], stream), read_size=STEP)
        while n := reader.readinto(sink.space()):
            sink.commit(n)
        return stream.done


class _Copying:
    """What ``write`` needs of an output (``DirectOut``'s ``space`` and ``commit``), over any
    file: one buffer, written out at each ``commit``."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out, self.buf = out, memoryview(bytearray(OUT_STEP))

    def space(self) -> memoryview:
        return self.buf

    def commit(self, n: int) -> None:
        self.out.write(self.buf[:n])


def _buffers(n: int) -> list[memoryview]:
    """``n`` page-aligned buffers of ``STEP`` bytes (O_DIRECT reads and writes need them)."""
    return [memoryview(mmap.mmap(-1, STEP)) for _ in range(n)]


_Chunk = tuple[memoryview, int, int]  # a buffer, and where its data starts and ends in it
_DISK_END = (memoryview(b""), 0, 0)  # after the last chunk of each disk


class _DiskStream:
    """The archive before compression, as a file to ``read``: magic, members and end. A
    thread reads the disks' data into a ring of ``STEP`` buffers; each buffer goes both to a
    hashing thread and to zstd (as a view handed out by ``read``), and back to the ring once
    both are done with it (zstd has copied what it was given when it asks for more). Neither
    waits for the other but for a free buffer, so a thread that the scheduler holds back
    does not stall the other on a busy host.

    Reads are O_DIRECT, widened to ``DIRECT_ALIGN`` (a backup reads each byte once: the
    page cache would only copy it one time more and push out what the host uses); a
    filesystem without O_DIRECT is read through the cache."""

    def __init__(self, start: Start, files: dict[str, bytes], disks: list[tuple[Disk, int]],
                 progress: Progress | None, cancel: threading.Event | None) -> None:
        self.start, self.files, self.disks = start, files, disks
        self.progress, self.cancel = progress, cancel
        self.total = sum(d.data_bytes for d, _ in disks)
        self.done = 0
        self.sums: dict[str, str] = {}
        self.free: queue.Queue[memoryview | None] = queue.Queue()
        for buf in _buffers(BUFFERS):
            self.free.put(buf)
        self.users: dict[int, int] = {}  # id of a buffer in use -> how many still use it
        self.lock = threading.Lock()
        self.hash_q: queue.Queue[_Chunk | BaseException | None] = queue.Queue()
        self.zstd_q: queue.Queue[_Chunk | BaseException | None] = queue.Queue()
        self.hash_error: BaseException | None = None
        self.stop = threading.Event()
        self.reader = threading.Thread(target=self.read_disks, name="archive-disk-read",
                                       daemon=True)
        self.hasher = threading.Thread(target=self.hash_disks, name="archive-hash",
                                       daemon=True)
        self.pieces = self.members()
        self.left = memoryview(b"")

    def __enter__(self) -> _DiskStream:
        self.reader.start()
        self.hasher.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for q in (self.free, self.hash_q, self.zstd_q):
            q.put(None)  # wakes a thread waiting on it
        self.reader.join()
        self.hasher.join()
        self.pieces.close()

    def read(self, n: int = -1) -> memoryview:
        while not self.left:
            piece = next(self.pieces, None)
            if piece is None:
                return memoryview(b"")
            self.left = piece
        out = self.left if n < 0 else self.left[:n]
        self.left = self.left[len(out):]
        return out

    def hand_on(self, item: _Chunk | BaseException) -> None:
        """A chunk (or the reading's failure) to both the hashing side and zstd."""
        if isinstance(item, tuple) and item is not _DISK_END:
            with self.lock:
                self.users[id(item[0])] = 2
        self.hash_q.put(item)
        self.zstd_q.put(item)

    def release(self, buf: memoryview) -> None:
        with self.lock:
            left = self.users.pop(id(buf)) - 1
            if left:
                self.users[id(buf)] = left
                return
        self.free.put(buf)

    def members(self) -> Generator[memoryview, None, None]:
        yield memoryview(MAGIC)
        head = _head(self.start)
        self.sums["start"] = hashlib.sha256(head).hexdigest()
        yield memoryview(head)
        for name, data in self.files.items():
            head = _head(File(name=name, size=len(data)))
            h = hashlib.sha256(head)
            h.update(data)
            self.sums[f"file:{name}"] = h.hexdigest()
            yield memoryview(head)
            yield memoryview(data)
        for disk, _fd in self.disks:
            yield memoryview(_head(disk))
            while (item := self.zstd_q.get()) is not _DISK_END:
                if item is None:
                    raise Cancelled("backup stopped")
                if isinstance(item, BaseException):
                    raise item
                if self.cancel is not None and self.cancel.is_set():
                    raise Cancelled("backup cancelled; the partial archive was removed")
                buf, lo, hi = item
                yield buf[lo:hi]
                self.release(buf)  # zstd has copied it: it asks for more only then
                self.done += hi - lo
                if self.progress:
                    self.progress(self.done, self.total)
        self.hasher.join()  # every disk's sum is in
        if self.hash_error is not None:
            raise self.hash_error
        # the hasher thread and this one fill ``sums`` in either order: write them in one
        # (start, files, disks), so the same snapshot always makes the same archive
        rank = {"start": 0, "file": 1, "disk": 2}
        sums = dict(sorted(self.sums.items(),
                           key=lambda kv: (rank.get(kv[0].split(":")[0], 3), kv[0])))
        yield memoryview(_head(End(sha256=sums)))

    def hash_disks(self) -> None:
        try:
            for disk, _fd in self.disks:
                h = hashlib.sha256(_head(disk))
                while (item := self.hash_q.get()) is not _DISK_END:
                    if item is None or isinstance(item, BaseException):
                        return  # stopped, or the reading failed: zstd's side raises it
                    buf, lo, hi = item
                    h.update(buf[lo:hi])
                    self.release(buf)
                self.sums[key(disk)] = h.hexdigest()
        except BaseException as e:  # raised by the compressing side
            self.hash_error = e

    def read_disks(self) -> None:
        try:
            for disk, fd in self.disks:
                self.read_disk(disk, fd)
                self.hand_on(_DISK_END)
        except BaseException as e:  # handed on, to be raised by the compressing side
            self.hand_on(e)

    def read_disk(self, disk: Disk, fd: int) -> None:
        direct = fileops.set_direct(fd, True)
        try:
            for off, length in disk.extents:
                end = off + length
                pos = off - off % ALIGN
                while pos < end:
                    buf = self.free.get()
                    if buf is None or self.stop.is_set():
                        raise Cancelled("backup stopped")
                    upto = min(pos + STEP, end)
                    try:
                        got = _read_full(fd, buf[:-(-upto // ALIGN) * ALIGN - pos], pos)
                    except OSError as e:
                        if not direct or e.errno != errno.EINVAL:
                            raise
                        direct = fileops.set_direct(fd, False)  # refused after all: cached
                        got = _read_full(fd, buf[:upto - pos], pos)
                    if got < upto - pos:
                        raise BadRequest("a disk of the snapshot ended early: was it changed?")
                    self.hand_on((buf, max(off - pos, 0), upto - pos))
                    pos = upto
        finally:
            if direct:
                fileops.set_direct(fd, False)


def _head(member: Start | File | Disk | End) -> bytes:
    """A member's length and header, as the stream has them."""
    raw = _encode.encode(member)
    return len(raw).to_bytes(4, "big") + raw


def _read_full(fd: int, view: memoryview, off: int) -> int:
    """Read into all of ``view`` from ``off``, fewer bytes only at the end of the file."""
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], off + got)
        if n == 0:
            break
        got += n
    return got


class DirectOut:
    """Where ``write`` puts an archive, the new file ``fd``: zstd compresses into
    ``STEP`` buffers that a thread writes with O_DIRECT where the filesystem has it (neither
    the copy into the page cache nor its write-back then costs CPU); the last, partial
    buffer is written through the cache at ``close``. The caller fsyncs ``fd`` after. An
    error of the writing thread (a full filesystem) is raised by ``commit`` or ``close``."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.direct = fileops.set_direct(fd, True)
        self.free: queue.Queue[memoryview] = queue.Queue()
        for buf in _buffers(FILE_BUFFERS):
            self.free.put(buf)
        self.full: queue.Queue[tuple[memoryview, int] | None] = queue.Queue()
        self.error: BaseException | None = None
        self.buf = self.free.get()
        self.fill = 0
        self.pos = 0  # where in the file the current buffer goes
        self.thread = threading.Thread(target=self.run, name="archive-write", daemon=True)
        self.thread.start()
        self.closed = False

    def space(self) -> memoryview:
        return self.buf[self.fill:]

    def commit(self, n: int) -> None:
        if self.error is not None:
            raise self.error
        self.fill += n
        if self.fill == STEP:
            self.full.put((self.buf, self.pos))
            self.pos += STEP
            self.buf = self.free.get()
            self.fill = 0

    def run(self) -> None:
        while (item := self.full.get()) is not None:
            buf, pos = item
            if self.error is None:
                try:
                    try:
                        fileops.write_at(self.fd, buf, pos)
                    except OSError as e:
                        if not self.direct or e.errno != errno.EINVAL:
                            raise
                        self.direct = False  # refused after all: through the cache
                        fileops.set_direct(self.fd, False)
                        fileops.write_at(self.fd, buf, pos)
                except BaseException as e:  # raised by the next commit, or by close
                    self.error = e
            self.free.put(buf)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.full.put(None)
        self.thread.join()
        if self.direct:
            fileops.set_direct(self.fd, False)
        if self.error is not None:
            raise self.error
        fileops.write_at(self.fd, self.buf[:self.fill], self.pos)

    def __enter__(self) -> DirectOut:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DirectIn:
    """The archive file ``fd`` to read, for ``read``: a thread reads it ahead in ``STEP``
    pieces with O_DIRECT (where the filesystem has it), and ``read`` hands out views of its
    buffers; a buffer goes back to the thread when zstd asks for what comes after it."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.free: queue.Queue[memoryview | None] = queue.Queue()
        for buf in _buffers(FILE_BUFFERS):
            self.free.put(buf)
        self.full: queue.Queue[tuple[memoryview, int] | BaseException | None] = queue.Queue()
        self.held: memoryview | None = None
        self.left = memoryview(b"")
        self.eof = False
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, name="archive-file-read", daemon=True)

    def __enter__(self) -> DirectIn:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.free.put(None)
        self.thread.join()

    def read(self, n: int = -1) -> memoryview:
        if not self.left:
            if self.held is not None:
                self.free.put(self.held)
                self.held = None
            if self.eof:
                return memoryview(b"")
            item = self.full.get()
            if isinstance(item, BaseException):
                raise item
            if item is None:
                self.eof = True
                return memoryview(b"")
            self.held, got = item
            self.left = self.held[:got]
        out = self.left if n < 0 else self.left[:n]
        self.left = self.left[len(out):]
        return out

    def run(self) -> None:
        direct = fileops.set_direct(self.fd, True)
        try:
            pos = 0
            while (buf := self.free.get()) is not None and not self.stop.is_set():
                try:
                    got = _read_full(self.fd, buf, pos)
                except OSError as e:
                    if not direct or e.errno != errno.EINVAL:
                        raise
                    direct = fileops.set_direct(self.fd, False)
                    got = _read_full(self.fd, buf, pos)
                if got == 0:
                    break
                self.full.put((buf, got))
                pos += got
            self.full.put(None)
        except BaseException as e:  # raised by read
            self.full.put(e)
        finally:
            if direct:
                fileops.set_direct(self.fd, False)


# -- reading -----------------------------------------------------------------------------------


class Sink(Protocol):
    """Where a reader puts what it reads; each step may refuse by raising."""

    def begin(self, start: Start) -> None: ...

    def file(self, name: str, data: bytes) -> None: ...

    def disk(self, disk: Disk) -> int:
        """A descriptor, of a file already ``disk.size`` bytes long, to write the data into."""
        ...


def read(src: IO[bytes] | DirectIn, sink: Sink, *, progress: Progress | None = None,
         cancel: threading.Event | None = None) -> Start:
    """Read a whole archive into ``sink``; every sum is checked at the end, and anything
    wrong (not an archive, newer format, damaged, cut short, a sum that differs, a hostile
    header) raises ``BadRequest`` or ``PayloadTooLarge``: the caller then removes what the
    sink made."""
    try:
        return _Reading(src, sink, progress, cancel).run()
    except zstandard.ZstdError as e:
        raise BadRequest(f"the archive is damaged ({e}); use another copy of it") from None


class _Reading:
    def __init__(self, src: IO[bytes] | DirectIn, sink: Sink, progress: Progress | None,
                 cancel: threading.Event | None) -> None:
        self.z = zstandard.ZstdDecompressor().stream_reader(
            cast(IO[bytes], src), read_size=STEP, read_across_frames=True)
        self.sink, self.progress, self.cancel = sink, progress, cancel
        self.sums: dict[str, str] = {}
        self.bufs = _buffers(BUFFERS)

    def exact(self, n: int, what: str) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self.z.read(n - len(out))
            if not chunk:
                raise BadRequest(f"the archive is cut short (in {what}); it was not written "
                                 "to the end: use another copy")
            out += chunk
        return bytes(out)

    def header(self) -> tuple[bytes, bytes]:
        head = self.exact(4, "a member's header")
        n = int.from_bytes(head, "big")
        if n > MAX_HEADER_BYTES:
            raise PayloadTooLarge(f"the archive is damaged, or not one Phyllome wrote: a member "
                                  f"header of {n} bytes (at most {MAX_HEADER_BYTES})")
        return head, self.exact(n, "a member's header")

    def run(self) -> Start:
        if self.exact(len(MAGIC), "the magic") != MAGIC:
            raise BadRequest("not a Phyllome backup archive (no PHYLLOME-BACKUP magic)")
        head, raw = self.header()
        try:
            version = msgspec.json.decode(raw, type=_Version)
        except msgspec.DecodeError:
            raise BadRequest("the archive's first member is not a valid start header (is the "
                             "archive damaged?)") from None
        if version.type != "start":
            raise BadRequest("the archive's first member is not a start header")
        if version.format > FORMAT:
            raise BadRequest(f"the archive has format {version.format}, newer than the "
                             f"{FORMAT} this Phyllome reads: restore it with a newer Phyllome")
        start = self.decode(raw)
        if not isinstance(start, Start) or start.format < 1:
            raise BadRequest("the archive's start header is not valid")
        self.sums["start"] = hashlib.sha256(head + raw).hexdigest()
        self.sink.begin(start)
        total = 0
        done = 0
        for _ in range(MAX_MEMBERS):
            head, raw = self.header()
            member = self.decode(raw)
            if isinstance(member, End):
                self.verify(member)
                return start
            if isinstance(member, Start) or key(member) in self.sums:
                raise BadRequest(f"the archive repeats member {key(member)}")
            h = hashlib.sha256(head + raw)
            if isinstance(member, File):
                if not 0 <= member.size <= MAX_FILE_BYTES:
                    raise PayloadTooLarge(f"file {member.name!r} of {member.size} bytes in the "
                                          f"archive (at most {MAX_FILE_BYTES})")
                data = self.exact(member.size, f"file {member.name}")
                h.update(data)
                self.sink.file(member.name, data)
            else:
                check_extents(member, len(start.snapshot.disks))
                total += member.data_bytes
                done = self.copy(member, h, done, total)
            self.sums[key(member)] = h.hexdigest()
        raise PayloadTooLarge(f"the archive has more than {MAX_MEMBERS} members")

    def decode(self, raw: bytes) -> Start | File | Disk | End:
        try:
            return _decode.decode(raw)
        except msgspec.DecodeError as e:
            raise BadRequest(f"the archive is damaged: a member header is not valid ({e})") \
                from None

    def copy(self, disk: Disk, h: hashlib._Hash, done: int, total: int) -> int:
        """The disk's data into the sink's file at its extents' offsets. Three steps run at
        once on ``STEP`` buffers: a thread decompresses, this one hashes, another writes
        (O_DIRECT where the filesystem has it: the restored disk is fsynced anyway, and the
        page cache would cost more CPU than the hashing); zstd, hashlib and the writes let
        go of the GIL."""
        fd = self.sink.disk(disk)
        free: queue.Queue[memoryview | None] = queue.Queue()
        for buf in self.bufs:
            free.put(buf)
        filled: queue.Queue[tuple[memoryview, int] | BaseException | None] = queue.Queue()
        hashed: queue.Queue[tuple[memoryview, int] | None] = queue.Queue()
        failed: list[BaseException] = []
        stop = threading.Event()

        def decompress() -> None:
            try:
                left = disk.data_bytes
                while left:
                    view = free.get()
                    if view is None or stop.is_set():
                        return
                    want = min(STEP, left)
                    n = 0
                    while n < want:  # whole buffers: the writes stay aligned
                        got = self.z.readinto(view[n:want])
                        if got == 0:
                            raise BadRequest(f"the archive is cut short (in disk {disk.index});"
                                             " use another copy")
                        n += got
                    filled.put((view, n))
                    left -= n
                filled.put(None)
            except BaseException as e:  # handed to the hashing side, which raises it
                filled.put(e)

        def write() -> None:
            direct = fileops.set_direct(fd, True)
            extents = iter(disk.extents)
            off = end = 0
            try:
                while (item := hashed.get()) is not None:
                    view, n = item
                    pos = 0
                    while pos < n:  # the stream's bytes, laid out over the extents in order
                        if off == end:
                            off, length = next(extents)
                            end = off + length
                        step = min(n - pos, end - off)
                        piece = view[pos:pos + step]
                        if direct and (off % ALIGN or step % ALIGN or pos % ALIGN):
                            fileops.set_direct(fd, False)  # an odd piece: through the cache
                            fileops.write_at(fd, piece, off)
                            fileops.set_direct(fd, True)
                        else:
                            try:
                                fileops.write_at(fd, piece, off)
                            except OSError as e:
                                if not direct or e.errno != errno.EINVAL:
                                    raise
                                direct = False  # refused after all: through the cache
                                fileops.set_direct(fd, False)
                                fileops.write_at(fd, piece, off)
                        pos += step
                        off += step
                    free.put(view)
            except BaseException as e:  # raised by the hashing side
                failed.append(e)
                stop.set()
                free.put(None)
                filled.put(None)
            finally:
                if direct:
                    fileops.set_direct(fd, False)

        workers = [threading.Thread(target=decompress, name="archive-read", daemon=True),
                   threading.Thread(target=write, name="archive-write", daemon=True)]
        for t in workers:
            t.start()
        try:
            while (item := filled.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                if self.cancel is not None and self.cancel.is_set():
                    raise Cancelled("restore cancelled; nothing was kept")
                view, n = item
                h.update(view[:n])
                hashed.put(item)
                done += n
                if self.progress:
                    self.progress(done, total)
        finally:
            stop.set()
            hashed.put(None)
            free.put(None)  # wakes a decompressor waiting for a buffer
            for t in workers:
                t.join()
        if failed:
            raise failed[0]
        return done

    def verify(self, end: End) -> None:
        if self.z.read(1):
            raise BadRequest("the archive has data after its end member")
        missing = sorted(set(end.sha256) - set(self.sums))
        extra = sorted(set(self.sums) - set(end.sha256))
        if missing or extra:
            raise BadRequest(f"the archive's members ({', '.join(sorted(self.sums))}) are not "
                             f"the ones its manifest lists ({', '.join(sorted(end.sha256))})")
        for name, digest in self.sums.items():
            if end.sha256[name] != digest:
                raise BadRequest(f"the archive is damaged: member {name} has sha256 "
                                 f"{digest[:12]}…, its manifest says {end.sha256[name][:12]}…; "
                                 "use another copy")


def check_extents(disk: Disk, disks: int) -> None:
    """Refuse extents that are unsorted, overlapping, empty or past the disk's end."""
    if not 0 <= disk.index < disks:
        raise BadRequest(f"disk {disk.index} of the archive is not one of the snapshot's "
                         f"{disks} disks")
    if disk.size < 0:
        raise BadRequest(f"disk {disk.index} of the archive has a negative size")
    pos = 0
    for off, length in disk.extents:
        if off < pos or length <= 0 or off + length > disk.size:
            raise BadRequest(f"disk {disk.index} of the archive has a bad extent "
                             f"({off}, {length}) for a size of {disk.size}")
        pos = off + length
