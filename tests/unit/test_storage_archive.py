"""The backup archive format on its own: round trip, and each way an archive is refused."""

from __future__ import annotations

import io
import os
import tempfile
import threading
from pathlib import Path

import msgspec
import pytest
import zstandard

from services.storage import archive
from services.storage.archive import Disk, File, Start
from shared.errors import BadRequest, Cancelled, PayloadTooLarge
from shared.messages.storage import SnapshotDisk, SnapshotInfo

SIZE = 4 << 20
EXTENTS = [(0, 4096), (1 << 20, 8192), (SIZE - 4096, 4096)]


class Sink:
    """Keeps what a reader gives it: files in memory, disks in temporary files."""

    def __init__(self) -> None:
        self.start: Start | None = None
        self.files: dict[str, bytes] = {}
        self.disks: dict[int, int] = {}

    def begin(self, start: Start) -> None:
        self.start = start

    def file(self, name: str, data: bytes) -> None:
        self.files[name] = data

    def disk(self, disk: Disk) -> int:
        fd, path = tempfile.mkstemp()
        os.unlink(path)
        os.ftruncate(fd, disk.size)
        self.disks[disk.index] = fd
        return fd


def disk_file(size: int = SIZE, extents: list[tuple[int, int]] = EXTENTS) -> tuple[int, bytes]:
    fd, path = tempfile.mkstemp(dir="/var/tmp")  # not tmpfs: O_DIRECT
    os.unlink(path)
    os.ftruncate(fd, size)
    content = bytearray(size)
    for off, n in extents:
        data = os.urandom(n)
        os.pwrite(fd, data, off)
        content[off:off + n] = data
    return fd, bytes(content)


def made(start: Start | None = None, files: dict[str, bytes] | None = None) -> tuple[bytes, bytes]:
    """(an archive of one disk and two files, the disk's content)."""
    fd, content = disk_file()
    start = start or Start(created=1.0, host="h1", snapshot=SnapshotInfo(
        pool="default", owner="u1", name="s1", created=1.0,
        disks=[SnapshotDisk(pool="default", volume="d0")]))
    out = io.BytesIO()
    archive.write(out, start, files if files is not None else {"vm.json": b"{}",
                                                               "nvram.fd": b"V" * 1000},
                  [(Disk(index=0, size=SIZE, extents=EXTENTS), fd)])
    os.close(fd)
    return out.getvalue(), content


def stream(*parts: bytes) -> bytes:
    """A zstd stream of magic and raw members, for hand-made archives."""
    return zstandard.ZstdCompressor().compress(archive.MAGIC + b"".join(parts))


def member(header: object, payload: bytes = b"") -> bytes:
    raw = msgspec.json.encode(header)
    return len(raw).to_bytes(4, "big") + raw + payload


def test_archive_round_trip_keeps_holes_files_and_sums() -> None:
    data, content = made()
    sink = Sink()
    start = archive.read(io.BytesIO(data), sink)
    assert start.snapshot.name == "s1" and start.format == archive.FORMAT
    assert sink.files == {"vm.json": b"{}", "nvram.fd": b"V" * 1000}
    fd = sink.disks[0]
    assert os.pread(fd, SIZE, 0) == content
    assert os.fstat(fd).st_blocks * 512 <= 64 << 10  # holes came back as holes
    assert zstandard.ZstdDecompressor().decompressobj().decompress(data).startswith(
        archive.MAGIC)


def test_every_flipped_byte_is_refused() -> None:
    data, _ = made()
    for pos in (len(data) // 3, len(data) // 2, len(data) - 10):
        bad = bytearray(data)
        bad[pos] ^= 0x01
        with pytest.raises(BadRequest, match="damaged|cut short|not valid"):
            archive.read(io.BytesIO(bytes(bad)), Sink())


def test_a_newer_format_is_refused_before_anything_is_read() -> None:
    newer = {"type": "start", "format": archive.FORMAT + 1, "whatever": [1, 2]}
    sink = Sink()
    with pytest.raises(BadRequest, match=f"format {archive.FORMAT + 1}, newer than"):
        archive.read(io.BytesIO(stream(member(newer))), sink)
    assert sink.start is None


@pytest.mark.parametrize(("data", "error", "match"), [
    (b"hello", BadRequest, "damaged"),
    (zstandard.ZstdCompressor().compress(b"NOT-AN-ARCHIVE..."), BadRequest, "not a Phyllome"),
    (stream(), BadRequest, "cut short"),
    (stream(member({"type": "file", "name": "x", "size": 1}, b"x")), BadRequest,
     "not a start header"),
    (stream((archive.MAX_HEADER_BYTES + 1).to_bytes(4, "big")), PayloadTooLarge,
     "member header of"),
])
def test_what_is_not_an_archive_is_refused(data: bytes, error: type[Exception],
                                            match: str) -> None:
    with pytest.raises(error, match=match):
        archive.read(io.BytesIO(data), Sink())


def test_hostile_members_are_refused() -> None:
    start = {"type": "start", "format": 1, "created": 1.0, "host": "h", "snapshot": {
        "type": "storage.snapshot.v1", "pool": "p", "owner": "o", "name": "n", "created": 1.0,
        "disks": [{"type": "storage.snapshot_disk.v1", "pool": "p", "volume": "d"}]}}
    cases = [
        ({"type": "disk", "index": 0, "size": 100, "extents": [[50, 100]]}, "bad extent"),
        ({"type": "disk", "index": 0, "size": 100, "extents": [[10, 5], [0, 5]]}, "bad extent"),
        ({"type": "disk", "index": 3, "size": 100, "extents": []}, "not one of"),
        ({"type": "file", "name": "big", "size": archive.MAX_FILE_BYTES + 1}, "at most"),
        ({"type": "start", "format": 1, "created": 1.0, "host": "h",
          "snapshot": start["snapshot"]}, "repeats"),
    ]
    for header, match in cases:
        with pytest.raises((BadRequest, PayloadTooLarge), match=match):
            archive.read(io.BytesIO(stream(member(start), member(header))), Sink())


def test_a_manifest_that_does_not_match_is_refused() -> None:
    data, _ = made(files={})
    plain = zstandard.ZstdDecompressor().decompressobj().decompress(data)
    end = plain.rindex(b'{"type":"end"')
    forged = plain[:end - 4] + member(archive.End(sha256={"start": "0" * 64}))
    with pytest.raises(BadRequest, match="are not the ones its manifest lists"):
        archive.read(io.BytesIO(zstandard.ZstdCompressor().compress(forged)), Sink())
    sums = msgspec.json.decode(plain[end:], type=archive.End).sha256
    wrong = {k: ("0" * 64 if k == "disk:0" else v) for k, v in sums.items()}
    forged = plain[:end - 4] + member(archive.End(sha256=wrong))
    with pytest.raises(BadRequest, match="member disk:0 has sha256"):
        archive.read(io.BytesIO(zstandard.ZstdCompressor().compress(forged)), Sink())
    trailing = plain + b"x"
    with pytest.raises(BadRequest, match="data after its end"):
        archive.read(io.BytesIO(zstandard.ZstdCompressor().compress(trailing)), Sink())


def test_file_members_are_checked_by_name() -> None:
    assert archive.key(File(name="a", size=1)) == "file:a"
    assert archive.key(Disk(index=2, size=1, extents=[])) == "disk:2"


def test_files_past_the_page_cache_and_odd_extents_round_trip(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """DirectOut and DirectIn (O_DIRECT where the filesystem has it) give the same archive
    as a plain file, and extents that are not block-aligned (a hostile or odd writer's)
    come back whole through the aligned reads and writes."""
    monkeypatch.setattr(archive, "STEP", 64 << 10)  # several buffers' worth, quickly
    size = 3 * archive.STEP + 5000
    odd = [(100, 5000), (archive.STEP - 7, archive.STEP + 20), (size - 3, 3)]
    fd, content = disk_file(size, odd)
    start = Start(created=1.0, host="h1", snapshot=SnapshotInfo(
        pool="default", owner="u1", name="s1", created=1.0,
        disks=[SnapshotDisk(pool="default", volume="d0")]))
    disks = [(Disk(index=0, size=size, extents=odd), fd)]
    plain = io.BytesIO()
    assert archive.write(plain, start, {"vm.json": b"{}"}, disks) == 5000 + archive.STEP + 23
    out = os.open(tmp_path / "a.phybak", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with archive.DirectOut(out) as direct:
        archive.write(direct, start, {"vm.json": b"{}"}, disks)
    os.close(out)
    os.close(fd)
    assert (tmp_path / "a.phybak").read_bytes() == plain.getvalue()
    src = os.open(tmp_path / "a.phybak", os.O_RDONLY)
    sink = Sink()
    with archive.DirectIn(src) as f:
        archive.read(f, sink)
    os.close(src)
    assert os.pread(sink.disks[0], size, 0) == content


def test_a_cancelled_backup_stops_its_threads() -> None:
    fd, _ = disk_file()
    before = threading.active_count()
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled, match="backup cancelled"):
        archive.write(io.BytesIO(), Start(created=1.0, host="h1", snapshot=SnapshotInfo(
            pool="default", owner="u1", name="s1", created=1.0,
            disks=[SnapshotDisk(pool="default", volume="d0")])), {},
            [(Disk(index=0, size=SIZE, extents=EXTENTS), fd)], cancel=cancel)
    os.close(fd)
    assert threading.active_count() == before


def test_a_disk_shorter_than_its_extents_is_refused() -> None:
    fd, _ = disk_file()
    with pytest.raises(BadRequest, match="ended early"):
        archive.write(io.BytesIO(), Start(created=1.0, host="h1", snapshot=SnapshotInfo(
            pool="default", owner="u1", name="s1", created=1.0,
            disks=[SnapshotDisk(pool="default", volume="d0")])), {},
            [(Disk(index=0, size=2 * SIZE, extents=[(SIZE - 4096, 8192)]), fd)])
    os.close(fd)
