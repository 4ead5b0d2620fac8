"""The pull pipeline (download.ImageStore) against a real HTTP server on loopback."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import lzma
import shutil
import subprocess
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import zstandard

from services.catalogue.config import Settings
from services.catalogue.download import ImageStore, _pieces
from shared.errors import Forbidden, InsufficientResources, NotFound
from shared.messages.catalogue import CatalogueEntry, Download
from tests.support.httpserver import FileServer, make_sparse_raw

pytestmark = pytest.mark.integration
MiB = 1 << 20


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[ImageStore]:
    local = tmp_path / "local"
    local.mkdir()
    s = ImageStore(Settings(pool_dir=str(tmp_path / "pool"), builtin_dir=str(local),
                            local_dirs=[str(local)], retries=3), host="h1")
    yield s
    await s.close()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def entry(image_id: str, url: str, path: Path | None, fmt: str = "raw",
          sha256: str | None = None, size: int | None = None) -> tuple[CatalogueEntry, Download]:
    dl = Download(arch="x86_64", url=url, format=fmt,
                  sha256=sha(path) if sha256 is None and path else sha256 or "",
                  size=path.stat().st_size if size is None and path else size or 0)
    return CatalogueEntry(id=image_id, name=image_id, source="test", downloads=[dl]), dl


async def no_progress(done: int, total: int, message: str) -> None:
    pass


def pool_files(store: ImageStore) -> list[str]:
    return sorted(p.name for p in store.pool.rglob("*") if p.is_file())


async def test_raw_image_is_verified_and_stored(srv: FileServer, store: ImageStore) -> None:
    raw = make_sparse_raw(srv.root / "disk.raw", 8 * MiB)
    e, dl = entry("disk", srv.url("disk.raw"), raw)
    local = await store.pull(e, dl, allow_unverified=False, progress=no_progress)
    assert local.state == "ready" and local.sha256 == sha(raw) == local.source_sha256
    assert Path(local.path).read_bytes() == raw.read_bytes()
    assert store.local("disk") == local
    assert pool_files(store) == ["disk.json", "disk.raw"]


async def test_qcow2_is_converted_to_raw(srv: FileServer, store: ImageStore,
                                         tmp_path: Path) -> None:
    raw = make_sparse_raw(tmp_path / "src.raw", 16 * MiB)
    qcow = srv.root / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow)],
                   check=True)
    e, dl = entry("q", srv.url("disk.qcow2"), qcow, fmt="qcow2")
    local = await store.pull(e, dl, allow_unverified=False, progress=no_progress)
    assert local.source_format == "qcow2" and local.source_sha256 == sha(qcow)
    assert local.sha256 == sha(raw) and Path(local.path).read_bytes() == raw.read_bytes()


@pytest.mark.parametrize("compress", [False, True])
async def test_raw_of_a_qcow2_is_hashed_while_it_converts_unless_compressed(
        srv: FileServer, store: ImageStore, tmp_path: Path, compress: bool) -> None:
    # plain clusters are hashed from the qcow2 (qemu-img map) during the convert; compressed
    # ones only qemu-img can read, so the RAW is read back after it
    raw = make_sparse_raw(tmp_path / "src.raw", 16 * MiB)
    with raw.open("r+b") as f:  # text compresses (random data would be stored plainly)
        f.seek(4 * MiB)
        f.write(b"phyllome" * (MiB // 8))
    qcow = srv.root / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", *(["-c"] if compress else []), "-f", "raw", "-O",
                    "qcow2", str(raw), str(qcow)], check=True)
    stages: list[str] = []

    async def progress(done: int, total: int, message: str) -> None:
        if not stages or stages[-1] != message:
            stages.append(message)

    e, dl = entry("q", srv.url("disk.qcow2"), qcow, fmt="qcow2")
    local = await store.pull(e, dl, allow_unverified=False, progress=progress)
    assert local.sha256 == sha(raw) and Path(local.path).read_bytes() == raw.read_bytes()
    assert ("hashing RAW" in stages) == compress, stages


def test_qcow2_map_to_pieces() -> None:
    plain = [{"start": 0, "length": 65536, "depth": 0, "present": True, "zero": False,
              "data": True, "offset": 327680},
             {"start": 65536, "length": 1 << 20, "depth": 0, "present": False, "zero": True,
              "data": False}]
    assert _pieces(plain) == [(0, 65536, 327680)]
    compressed = [{"start": 0, "length": 65536, "depth": 0, "present": True, "zero": False,
                   "data": True}]
    assert _pieces(compressed) is None


async def test_xz_raw_is_unpacked(srv: FileServer, store: ImageStore, tmp_path: Path) -> None:
    raw = make_sparse_raw(tmp_path / "src.raw", 8 * MiB)
    xz = srv.root / "disk.raw.xz"
    xz.write_bytes(lzma.compress(raw.read_bytes(), preset=0))
    e, dl = entry("x", srv.url("disk.raw.xz"), xz)
    local = await store.pull(e, dl, allow_unverified=False, progress=no_progress)
    assert local.sha256 == sha(raw) and local.source_sha256 == sha(xz)
    assert Path(local.path).read_bytes() == raw.read_bytes()


@pytest.mark.parametrize("suffix, pack", [
    ("gz", lambda b: gzip.compress(b, 1)),
    ("zst", lambda b: zstandard.ZstdCompressor(level=1).compress(b)),
])
async def test_gz_and_zst_raw_are_unpacked(srv: FileServer, store: ImageStore, tmp_path: Path,
                                           suffix: str, pack: Callable[[bytes], bytes]) -> None:
    raw = make_sparse_raw(tmp_path / "src.raw", 4 * MiB)
    packed = srv.root / f"disk.raw.{suffix}"
    packed.write_bytes(pack(raw.read_bytes()))
    e, dl = entry("p", srv.url(packed.name), packed)
    local = await store.pull(e, dl, allow_unverified=False, progress=no_progress)
    assert local.sha256 == sha(raw) and Path(local.path).read_bytes() == raw.read_bytes()


@pytest.mark.parametrize("fmt", ["vmdk", "vhdx"])
async def test_vmdk_and_vhdx_are_converted(srv: FileServer, store: ImageStore, tmp_path: Path,
                                           fmt: str) -> None:
    raw = make_sparse_raw(tmp_path / "src.raw", 8 * MiB)
    image = srv.root / f"disk.{fmt}"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", fmt, str(raw), str(image)],
                   check=True)
    e, dl = entry("c", srv.url(image.name), image, fmt=fmt)
    local = await store.pull(e, dl, allow_unverified=False, progress=no_progress)
    assert local.source_format == fmt and local.sha256 == sha(raw)


async def test_corrupt_xz_is_refused(srv: FileServer, store: ImageStore) -> None:
    bad = srv.root / "bad.raw.xz"
    bad.write_bytes(lzma.compress(bytes(MiB))[:200])
    e, dl = entry("bad", srv.url(bad.name), bad)
    with pytest.raises(Forbidden, match="xz payload is corrupt"):
        await store.pull(e, dl, allow_unverified=False, progress=no_progress)
    assert pool_files(store) == []


async def test_tampered_image_is_refused_and_nothing_left(srv: FileServer,
                                                          store: ImageStore) -> None:
    raw = make_sparse_raw(srv.root / "disk.raw", 4 * MiB)
    e, dl = entry("t", srv.url("disk.raw"), raw, sha256="0" * 64)
    with pytest.raises(Forbidden, match="sha256 of .* is .*publishes 0000"):
        await store.pull(e, dl, allow_unverified=False, progress=no_progress)
    assert pool_files(store) == []


async def test_html_page_with_status_200_is_refused(srv: FileServer,
                                                    store: ImageStore) -> None:
    srv.html_for_missing = True
    e, dl = entry("h", srv.url("gone.raw"), None, sha256="1" * 64, size=0)
    with pytest.raises(Forbidden, match="text/html"):
        await store.pull(e, dl, allow_unverified=False, progress=no_progress)
    assert pool_files(store) == []


async def test_html_body_declared_as_octet_stream_is_refused(srv: FileServer,
                                                             store: ImageStore) -> None:
    page = srv.root / "page.raw"
    page.write_bytes(b"\n  <!DOCTYPE html><html><body>Mirror maintenance</body></html>")
    e, dl = entry("h", srv.url("page.raw"), page)
    with pytest.raises(Forbidden, match="HTML/XML page"):
        await store.pull(e, dl, allow_unverified=False, progress=no_progress)
    assert pool_files(store) == []


async def test_wrong_content_type_is_refused(srv: FileServer, store: ImageStore) -> None:
    raw = make_sparse_raw(srv.root / "disk.raw", 2 * MiB)
    srv.content_type = "text/plain"
    e, dl = entry("c", srv.url("disk.raw"), raw)
    with pytest.raises(Forbidden, match="Content-Type 'text/plain'"):
        await store.pull(e, dl, allow_unverified=False, progress=no_progress)


async def test_404_is_link_rot(srv: FileServer, store: ImageStore) -> None:
    e, dl = entry("g", srv.url("gone.raw"), None, sha256="1" * 64, size=0)
    with pytest.raises(NotFound, match="answered 404"):
        await store.pull(e, dl, allow_unverified=False, progress=no_progress)
    assert await store.probe(srv.url("gone.raw")) == (
        False, 0, f"{srv.url('gone.raw')} answered 404: the image is gone from its "
        "server (link rot); refresh the source or use a mirror")


async def test_probe_without_head_asks_for_one_byte(srv: FileServer,
                                                    store: ImageStore) -> None:
    make_sparse_raw(srv.root / "disk.raw", MiB)
    srv.head_allowed = False
    assert await store.probe(srv.url("disk.raw")) == (True, 206, "")
    assert srv.gets("disk.raw") == ["bytes=0-0"]
    srv.content_type = "text/html"
    ok, _, reason = await store.probe(srv.url("disk.raw"))
    assert not ok and "text/html" in reason


async def test_cut_half_way_resumes_with_range(srv: FileServer, store: ImageStore) -> None:
    raw = make_sparse_raw(srv.root / "disk.raw", 8 * MiB)
    srv.drop_after = 3 * MiB + 123
    e, dl = entry("r", srv.url("disk.raw"), raw)
    local = await store.pull(e, dl, allow_unverified=False, progress=no_progress)
    assert srv.drops == 1
    assert srv.gets("disk.raw") == ["", f"bytes={3 * MiB + 123}-"]
    assert local.sha256 == sha(raw)


async def test_truncated_body_without_size_is_resumed(srv: FileServer,
                                                      store: ImageStore) -> None:
    raw = make_sparse_raw(srv.root / "disk.raw", 4 * MiB)
    srv.drop_after = MiB
    e, dl = entry("r", srv.url("disk.raw"), raw, size=0)
    dl2 = Download(arch="x86_64", url=dl.url, format="raw", sha256=dl.sha256)
    local = await store.pull(e, dl2, allow_unverified=False, progress=no_progress)
    assert local.sha256 == sha(raw) and srv.gets("disk.raw")[1] == f"bytes={MiB}-"


async def test_unverified_is_refused_unless_allowed(srv: FileServer,
                                                    store: ImageStore) -> None:
    raw = make_sparse_raw(srv.root / "disk.raw", 2 * MiB)
    e, dl = entry("u", srv.url("disk.raw"), raw, sha256="")
    dl = Download(arch="x86_64", url=dl.url, format="raw")
    with pytest.raises(Forbidden, match="no published sha256.*--allow-unverified"):
        await store.pull(e, dl, allow_unverified=False, progress=no_progress)
    assert srv.gets("disk.raw") == []
    local = await store.pull(e, dl, allow_unverified=True, progress=no_progress)
    assert local.state == "unverified" and local.sha256 == sha(raw)


async def test_redirect_to_another_scheme_is_refused(srv: FileServer,
                                                     store: ImageStore) -> None:
    srv.redirects["old.raw"] = "file:///etc/passwd"
    e, dl = entry("r", srv.url("old.raw"), None, sha256="1" * 64, size=0)
    with pytest.raises(Forbidden, match="redirects to 'file:///etc/passwd'"):
        await store.pull(e, dl, allow_unverified=False, progress=no_progress)


async def test_redirect_on_the_same_scheme_is_followed(srv: FileServer,
                                                       store: ImageStore) -> None:
    raw = make_sparse_raw(srv.root / "disk.raw", MiB)
    srv.redirects["old.raw"] = "/disk.raw"
    e, dl = entry("r", srv.url("old.raw"), raw)
    assert (await store.pull(e, dl, allow_unverified=False, progress=no_progress)).sha256


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/x.raw",
                                 "gopher://x/y", "data:,hello", "/etc/shadow"])
async def test_non_http_urls_are_refused(store: ImageStore, url: str) -> None:
    e, dl = entry("f", url, None, sha256="1" * 64, size=1)
    with pytest.raises(Forbidden, match="refusing"):
        await store.pull(e, dl, allow_unverified=False, progress=no_progress)


async def test_file_url_under_a_local_source_is_pulled(store: ImageStore,
                                                       tmp_path: Path) -> None:
    raw = make_sparse_raw(tmp_path / "local" / "disk.raw", 4 * MiB)
    e, dl = entry("l", raw.as_uri(), raw)
    local = await store.pull(e, dl, allow_unverified=False, progress=no_progress)
    assert local.sha256 == sha(raw) and raw.exists()
    assert Path(local.path).read_bytes() == raw.read_bytes()


async def test_missing_local_file_is_not_found(store: ImageStore, tmp_path: Path) -> None:
    gone = tmp_path / "local" / "gone.raw"
    e, dl = entry("l", gone.as_uri(), None, sha256="1" * 64, size=1)
    with pytest.raises(NotFound, match="cannot read .*gone.raw: No such file"):
        await store.pull(e, dl, allow_unverified=False, progress=no_progress)
    assert pool_files(store) == []


async def test_local_source_may_hold_a_symlink_but_not_dotdot(store: ImageStore,
                                                            tmp_path: Path) -> None:
    outside = make_sparse_raw(tmp_path / "build.raw", MiB)
    (tmp_path / "local" / "tiny.raw").symlink_to(outside)
    e, dl = entry("l", (tmp_path / "local" / "tiny.raw").as_uri(), outside)
    assert (await store.pull(e, dl, allow_unverified=False, progress=no_progress)).sha256
    sneaky = f"file://{tmp_path}/local/../build.raw"
    e, dl = entry("s", sneaky, outside)
    with pytest.raises(Forbidden, match="only read under a configured local source"):
        await store.pull(e, dl, allow_unverified=False, progress=no_progress)


async def test_image_bigger_than_free_space_refused_before_download(
        srv: FileServer, store: ImageStore) -> None:
    make_sparse_raw(srv.root / "disk.raw", MiB)
    e, dl = entry("big", srv.url("disk.raw"), None, sha256="1" * 64, size=1 << 60)
    with pytest.raises(InsufficientResources, match="bytes free"):
        await store.pull(e, dl, allow_unverified=False, progress=no_progress)
    assert srv.requests == []


async def test_pool_filling_up_mid_download_is_insufficient_resources(
        srv: FileServer, small_ext4: Path) -> None:
    raw = make_sparse_raw(srv.root / "disk.raw", 32 * MiB)
    srv.rate = 8 * MiB  # progress is reported while the body still flows
    s = ImageStore(Settings(pool_dir=str(small_ext4 / "pool"), builtin_dir=str(srv.root),
                            retries=0), host="h1")
    filler = small_ext4 / "filler"

    async def progress(done: int, total: int, message: str) -> None:
        # The free-space check before the download passed; now the pool fills up under it.
        if done and not filler.exists():
            free = shutil.disk_usage(small_ext4).free
            subprocess.run(["fallocate", "-l", str(free), str(filler)], check=True)

    try:
        e, dl = entry("disk", srv.url("disk.raw"), raw)
        with pytest.raises(InsufficientResources,
                           match="image pool .* ran out of space while pulling disk; nothing"):
            await s.pull(e, dl, allow_unverified=False, progress=progress)
        assert filler.exists()
        assert pool_files(s) == []
    finally:
        await s.close()


async def test_decompression_bomb_is_refused(srv: FileServer, tmp_path: Path) -> None:
    bomb = srv.root / "bomb.raw.xz"
    bomb.write_bytes(lzma.compress(bytes(64 * MiB)))
    s = ImageStore(Settings(pool_dir=str(tmp_path / "pool"), builtin_dir=str(tmp_path),
                            max_unpacked_bytes=16 * MiB), host="h1")
    try:
        e, dl = entry("bomb", srv.url("bomb.raw.xz"), bomb)
        with pytest.raises(Forbidden, match="decompression bomb"):
            await s.pull(e, dl, allow_unverified=False, progress=no_progress)
        assert pool_files(s) == []
    finally:
        await s.close()


async def test_format_confusion_is_refused(srv: FileServer, store: ImageStore,
                                           tmp_path: Path) -> None:
    raw = make_sparse_raw(tmp_path / "src.raw", MiB)
    qcow = srv.root / "disk.img"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(qcow)], check=True)
    e, dl = entry("q", srv.url("disk.img"), qcow, fmt="raw")
    with pytest.raises(Forbidden, match="payload is qcow2, the source says raw"):
        await store.pull(e, dl, allow_unverified=False, progress=no_progress)


async def test_qcow2_with_backing_file_is_refused(srv: FileServer, store: ImageStore,
                                                  tmp_path: Path) -> None:
    qcow = srv.root / "evil.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", "-F", "raw", "-b", "/etc/hostname",
                    str(qcow), "1M"], check=True, capture_output=True)
    e, dl = entry("evil", srv.url("evil.qcow2"), qcow, fmt="qcow2")
    with pytest.raises(Forbidden, match="backing file"):
        await store.pull(e, dl, allow_unverified=False, progress=no_progress)
    assert pool_files(store) == []


async def test_slow_download_cancelled_leaves_nothing(srv: FileServer,
                                                      store: ImageStore) -> None:
    # the body is read in worker threads: a cancel stops them, it does not wait out the body
    raw = make_sparse_raw(srv.root / "disk.raw", 16 * MiB)
    srv.rate = 128 << 10  # two minutes for the whole body
    started = asyncio.Event()

    async def progress(done: int, total: int, message: str) -> None:
        if done > 0:
            started.set()

    e, dl = entry("slow", srv.url("disk.raw"), raw)
    task = asyncio.create_task(store.pull(e, dl, allow_unverified=False, progress=progress))
    await asyncio.wait_for(started.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, timeout=30)
    assert pool_files(store) == []
    assert not [t for t in threading.enumerate() if t.name.startswith("pull-write")]


async def test_install_media_stays_an_iso_and_a_disk_posing_as_one_is_refused(
        srv: FileServer, store: ImageStore) -> None:
    from services.vm.cloudinit import seed_iso
    from shared.messages.vm import CloudInit

    iso = srv.root / "install.iso"
    iso.write_bytes(seed_iso(CloudInit(instance_id="x")))  # a small ISO9660 volume
    e, dl = entry("inst", srv.url("install.iso"), iso, fmt="iso", sha256="")
    with pytest.raises(Forbidden, match="--allow-unverified"):
        await store.pull(e, dl, allow_unverified=False, progress=no_progress)
    local = await store.pull(e, dl, allow_unverified=True, progress=no_progress)
    assert (local.source_format, local.state) == ("iso", "unverified")
    assert Path(local.path).read_bytes() == iso.read_bytes()
    raw = make_sparse_raw(srv.root / "disk.raw", 2 * MiB)
    e, dl = entry("fake", srv.url("disk.raw"), raw, fmt="iso")
    with pytest.raises(Forbidden, match="not an ISO9660 or UDF image"):
        await store.pull(e, dl, allow_unverified=False, progress=no_progress)
