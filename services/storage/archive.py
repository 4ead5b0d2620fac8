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
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from collections.abc import Callable
from typing import IO, Protocol

import msgspec
import zstandard

from shared.errors import BadRequest, Cancelled, PayloadTooLarge
from shared.fileops import write_at
from shared.messages.storage import Extent, SnapshotInfo

MAGIC = b"PHYLLOME-BACKUP\n"
FORMAT = 1
SUFFIX = ".phybak"
LEVEL = 3  # zstd's own default: the comparison a user would run
MAX_HEADER_BYTES = 4 << 20  # a disk's extent list: 250,000 extents fit
MAX_FILE_BYTES = 8 << 20  # UEFI variables and TPM state are a few MiB at most
MAX_MEMBERS = 256
STEP = 8 << 20  # bytes per read and write of disk data
BUFFERS = 3  # disk data in flight while restoring: one filling, one hashed, one spare

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


def write(out: IO[bytes], start: Start, files: dict[str, bytes],
          disks: list[tuple[Disk, int]], *, progress: Progress | None = None,
          cancel: threading.Event | None = None, level: int = LEVEL) -> int:
    """Write the archive of ``start``'s snapshot to ``out``; returns the data bytes read.

    ``disks`` pairs each disk's header (its extents already found) with a descriptor to read
    it from. zstd compresses in a worker thread while this one reads and hashes, so the two
    cores are both busy.
    """
    total = sum(d.data_bytes for d, _ in disks)
    done = 0
    sums: dict[str, str] = {}
    z = zstandard.ZstdCompressor(level=level, write_checksum=True, threads=1)
    with z.stream_writer(out, closefd=False) as w:
        w.write(MAGIC)

        def header(member: Start | File | Disk) -> hashlib._Hash:
            raw = _encode.encode(member)
            head = len(raw).to_bytes(4, "big") + raw
            h = hashlib.sha256(head)
            w.write(head)
            return h

        sums["start"] = header(start).hexdigest()
        for name, data in files.items():
            h = header(File(name=name, size=len(data)))
            h.update(data)
            w.write(data)
            sums[f"file:{name}"] = h.hexdigest()
        buf = bytearray(STEP)
        view = memoryview(buf)
        for disk, fd in disks:
            h = header(disk)
            for off, length in disk.extents:
                end = off + length
                while off < end:
                    if cancel is not None and cancel.is_set():
                        raise Cancelled("backup cancelled; the partial archive was removed")
                    n = os.preadv(fd, [view[: min(STEP, end - off)]], off)
                    if n == 0:
                        raise BadRequest("a disk of the snapshot ended early: was it changed?")
                    chunk = view[:n]
                    h.update(chunk)
                    w.write(chunk)
                    off += n
                    done += n
                    if progress:
                        progress(done, total)
            sums[key(disk)] = h.hexdigest()
        raw = _encode.encode(End(sha256=sums))
        w.write(len(raw).to_bytes(4, "big") + raw)
    return done


# -- reading -----------------------------------------------------------------------------------


class Sink(Protocol):
    """Where a reader puts what it reads; each step may refuse by raising."""

    def begin(self, start: Start) -> None: ...

    def file(self, name: str, data: bytes) -> None: ...

    def disk(self, disk: Disk) -> int:
        """A descriptor, of a file already ``disk.size`` bytes long, to write the data into."""
        ...


def read(src: IO[bytes], sink: Sink, *, progress: Progress | None = None,
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
    def __init__(self, src: IO[bytes], sink: Sink, progress: Progress | None,
                 cancel: threading.Event | None) -> None:
        self.z = zstandard.ZstdDecompressor().stream_reader(src, read_size=1 << 20,
                                                            read_across_frames=True)
        self.sink, self.progress, self.cancel = sink, progress, cancel
        self.sums: dict[str, str] = {}
        self.bufs = [bytearray(STEP) for _ in range(BUFFERS)]

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
        """The disk's data into the sink's file at its extents' offsets. A thread
        decompresses into a few buffers while this one hashes and writes the filled ones
        (zstd and hashlib let go of the GIL), so the two cores share the work."""
        fd = self.sink.disk(disk)
        free: queue.Queue[memoryview] = queue.Queue()
        for buf in self.bufs:
            free.put(memoryview(buf))
        filled: queue.Queue[tuple[memoryview, int] | BaseException | None] = queue.Queue()
        stop = threading.Event()

        def decompress() -> None:
            try:
                left = disk.data_bytes
                while left and not stop.is_set():
                    view = free.get()
                    if stop.is_set():
                        break
                    n = self.z.readinto(view[: min(STEP, left)])
                    if n == 0:
                        raise BadRequest(f"the archive is cut short (in disk {disk.index}); "
                                         "use another copy")
                    filled.put((view, n))
                    left -= n
                filled.put(None)
            except BaseException as e:  # handed to the writing side, which raises it
                filled.put(e)

        worker = threading.Thread(target=decompress, name="archive-read", daemon=True)
        worker.start()
        extents = iter(disk.extents)
        off = end = 0
        try:
            while (item := filled.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                if self.cancel is not None and self.cancel.is_set():
                    raise Cancelled("restore cancelled; nothing was kept")
                view, n = item
                h.update(view[:n])
                pos = 0
                while pos < n:  # the stream's bytes, laid out over the extents in order
                    if off == end:
                        off, length = next(extents)
                        end = off + length
                    step = min(n - pos, end - off)
                    write_at(fd, view[pos:pos + step], off)
                    pos += step
                    off += step
                free.put(view)
                done += n
                if self.progress:
                    self.progress(done, total)
        finally:
            stop.set()
            free.put(memoryview(bytearray(0)))  # wakes a decompressor waiting for a buffer
            worker.join()
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
