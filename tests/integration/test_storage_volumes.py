"""The filesystem adapter on real files: ext4 here, XFS with reflink and a small ext4 on loop
devices made in the test. Bad names, sizes, planted symlinks, non-RAW imports, ENOSPC and
cancel in the middle of a clone: each a clear error, nothing left behind, nothing outside
the pool touched."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.storage.volumes import Pools
from shared.errors import (
    BadRequest,
    Cancelled,
    Conflict,
    Forbidden,
    InsufficientResources,
    InvalidName,
    NotFound,
)
from tests.support.loopfs import (
    make_sparse,
    same_sparse_content,
    scatter,
)
from tests.support.require import require

GiB = 1 << 30
MiB = 1 << 20


@pytest.fixture
def pools(tmp_path: Path) -> Iterator[Pools]:
    (tmp_path / "import").mkdir()
    p = Pools({"default": str(tmp_path / "pool")}, [str(tmp_path / "import")])
    yield p
    p.close()


@pytest.fixture
def ext4_pools(ext4: Path) -> Iterator[Pools]:
    """Pools on a loop-mounted ext4, so the sparse-copy path is the one taken."""
    p = Pools({"default": str(ext4 / "pool")})
    assert not p.pool("default").reflink
    yield p
    p.close()


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MiB):
            h.update(chunk)
    return h.hexdigest()


def leftovers(pool_dir: Path) -> list[str]:
    return sorted(p.name for p in pool_dir.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("name, why", [
    ("a/b", "contains '/'"), ("../etc", "contains '/'"), ("..", "contains '..'"),
    ("x..y", "contains '..'"), ("a\x00b", "NUL"), ("-rf", "starts with '-'"),
    ("x" * 300, "300 bytes long; at most 255"), ("", "empty"), (".hidden", "starts with '.'"),
    ("sp ace", "characters other than"),
])
def test_bad_names_are_refused(pools: Pools, name: str, why: str) -> None:
    with pytest.raises(InvalidName, match=why.replace("(", r"\(").replace(".", r"\.")):
        pools.create("default", name, MiB)
    with pytest.raises(InvalidName):
        pools.info("default", name)
    assert os.listdir(pools.pool("default").path) == []


@pytest.mark.parametrize("size, error, why", [
    (-1, BadRequest, "positive"), (0, BadRequest, "positive"),
    (1000, BadRequest, "multiple of 512"),
    (1 << 60, InsufficientResources, "beyond pool 'default'"),
])
def test_bad_sizes_are_refused(pools: Pools, size: int, error: type, why: str) -> None:
    with pytest.raises(error, match=why):
        pools.create("default", "disk", size)
    assert not (Path(pools.pool("default").path) / "disk").exists()


def test_preallocation_beyond_free_space_is_refused(pools: Pools) -> None:
    _, free = pools.pool("default").space()
    size = (free + GiB) // 512 * 512
    with pytest.raises(InsufficientResources, match="free, preallocating"):
        pools.create("default", "big", size, preallocate=True)


def test_create_resize_delete_on_ext4(ext4_pools: Pools) -> None:
    pools = ext4_pools
    info = pools.create("default", "disk0", 10 * GiB)
    assert (info.virtual_bytes, info.allocated_bytes) == (10 * GiB, 0)
    pre = pools.create("default", "disk1", 8 * MiB, preallocate=True)
    assert pre.allocated_bytes >= 8 * MiB
    assert pools.resize("default", "disk0", 12 * GiB).virtual_bytes == 12 * GiB
    with pytest.raises(BadRequest, match="only growing"):
        pools.resize("default", "disk0", GiB)
    with pytest.raises(Conflict, match="exists already"):
        pools.create("default", "disk0", GiB)
    assert [v.name for v in pools.volumes("default")] == ["disk0", "disk1"]
    pools.delete("default", "disk0")
    with pytest.raises(NotFound, match="no volume 'disk0'"):
        pools.info("default", "disk0")
    with pytest.raises(NotFound, match="no pool 'nope'"):
        pools.volumes("nope")


def test_sparse_clone_on_ext4_keeps_content_and_holes(ext4_pools: Pools) -> None:
    pools = ext4_pools
    src = Path(pools.path_of("default", "big"))
    make_sparse(src, 12 * GiB, scatter(12 * GiB, 48, MiB))
    seen: list[tuple[int, int]] = []
    result = pools.clone("default", "big", "default", "copy",
                         progress=lambda d, t: seen.append((d, t)))
    dst = Path(result.volume.path)
    assert result.method == "copy"
    assert seen[-1][0] == seen[-1][1]
    assert same_sparse_content(src, dst)
    allocated = os.stat(src).st_blocks * 512
    assert abs(result.volume.allocated_bytes - allocated) <= allocated / 100
    assert leftovers(Path(pools.pool("default").path)) == []


def test_clone_onto_an_existing_name_or_itself_is_refused(pools: Pools) -> None:
    pools.create("default", "a", MiB)
    pools.create("default", "b", MiB)
    with pytest.raises(Conflict, match="exists already"):
        pools.clone("default", "a", "default", "b")
    with pytest.raises(BadRequest, match="onto itself"):
        pools.clone("default", "a", "default", "a")


def test_two_clones_to_the_same_destination(pools: Pools) -> None:
    pools.create("default", "src", MiB)
    pool = pools.pool("default")
    pools.claim(pool, "dst")  # what the agent does when it accepts the first clone job
    try:
        with pytest.raises(Conflict, match="being created by another request"):
            pools.clone("default", "src", "default", "dst")
    finally:
        pools.release(pool, "dst")
    assert pools.clone("default", "src", "default", "dst").volume.name == "dst"


def test_symlink_planted_in_the_pool_is_never_followed(pools: Pools, tmp_path: Path) -> None:
    outside = tmp_path / "secret"
    outside.write_bytes(b"do not touch" * 100)
    before = (outside.read_bytes(), outside.stat().st_mtime_ns)
    pool_dir = Path(pools.pool("default").path)
    (pool_dir / "evil").symlink_to(outside)
    assert [v.name for v in pools.volumes("default")] == []
    for call in (lambda: pools.info("default", "evil"), lambda: pools.sha256("default", "evil"),
                 lambda: pools.resize("default", "evil", GiB),
                 lambda: pools.delete("default", "evil"),
                 lambda: pools.clone("default", "evil", "default", "copy"),
                 lambda: pools.open_for_reading("default", "evil")):
        with pytest.raises(Forbidden, match="symlink"):
            call()
    pools.create("default", "ok", MiB)
    with pytest.raises(Conflict):
        pools.clone("default", "ok", "default", "evil")
    assert (outside.read_bytes(), outside.stat().st_mtime_ns) == before
    assert (pool_dir / "evil").is_symlink()


@pytest.mark.parametrize("fmt, label", [
    ("qcow2", "qcow2"), ("vmdk", "VMDK"), ("vpc", "VHD"), ("vhdx", "VHDX"), ("vdi", "VDI"),
])
def test_import_refuses_non_raw_images(pools: Pools, tmp_path: Path, fmt: str,
                                       label: str) -> None:
    require(shutil.which("qemu-img") is not None, "qemu-img (apt qemu-utils)")
    image = tmp_path / "import" / f"disk.{fmt}"
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(image), "64M"], check=True)
    with pytest.raises(BadRequest, match=f"is a {label} image, not RAW.*qemu-img convert -f "
                                         f"{fmt} -O raw"):
        pools.import_file(str(image), "default", "disk")
    assert pools.volumes("default") == []


def test_import_raw_copies_or_moves(pools: Pools, tmp_path: Path) -> None:
    raw = tmp_path / "import" / "disk.raw"
    make_sparse(raw, GiB, scatter(GiB, 4, MiB))
    digest = sha256_of(raw)
    copied = pools.import_file(str(raw), "default", "copied")
    assert copied.method in ("copy", "reflink") and raw.exists()
    moved = pools.import_file(str(raw), "default", "moved", move=True)
    assert moved.method == "rename" and not raw.exists()
    assert pools.sha256("default", "copied") == pools.sha256("default", "moved") == digest


def test_import_only_from_import_dirs(pools: Pools, tmp_path: Path) -> None:
    stray = tmp_path / "stray.raw"
    stray.write_bytes(bytes(4096))
    with pytest.raises(Forbidden, match="outside the import directories"):
        pools.import_file(str(stray), "default", "x")
    link = tmp_path / "import" / "link.raw"
    link.symlink_to(stray)
    with pytest.raises(Forbidden, match="goes through a symlink"):
        pools.import_file(str(link), "default", "x")
    with pytest.raises(BadRequest, match="absolute"):
        pools.import_file("import/x.raw", "default", "x")


def test_cancel_mid_clone_leaves_nothing(pools: Pools) -> None:
    src = Path(pools.path_of("default", "src"))
    make_sparse(src, 4 * GiB, scatter(4 * GiB, 16, MiB))
    cancel = threading.Event()
    calls = []

    def progress(done: int, total: int) -> None:
        calls.append(done)
        cancel.set()  # after the first step

    with pytest.raises(Cancelled, match="cancelled"):
        pools.clone("default", "src", "default", "dst", progress=progress, cancel=cancel)
    assert len(calls) == 1
    assert leftovers(Path(pools.pool("default").path)) == []
    assert [v.name for v in pools.volumes("default")] == ["src"]


def test_enospc_mid_clone_is_clean(tmp_path: Path, small_ext4: Path) -> None:
    pools = Pools({"default": str(tmp_path / "pool"), "small": str(small_ext4 / "pool")})
    try:
        src = Path(pools.path_of("default", "src"))
        make_sparse(src, 2 * GiB, scatter(2 * GiB, 24, MiB))
        small = pools.pool("small")
        _, free_before = small.space()
        filler = small_ext4 / "filler"

        def fill_up(done: int, total: int) -> None:
            # The check before the copy passed; now the filesystem fills up under it.
            if not filler.exists():
                subprocess.run(["fallocate", "-l", str(small.space()[1]), str(filler)])

        with pytest.raises(InsufficientResources, match="ran out of space.*nothing was left"):
            pools.clone("default", "src", "small", "dst", progress=fill_up)
        assert filler.exists()
        filler.unlink()
        assert pools.volumes("small") == []
        assert leftovers(Path(small.path)) == []
        assert abs(small.space()[1] - free_before) <= MiB
        with pytest.raises(InsufficientResources, match="has .* free, cloning default/src"):
            src2 = Path(pools.path_of("default", "src2"))
            make_sparse(src2, GiB, scatter(GiB, 80, MiB))
            pools.clone("default", "src2", "small", "dst")
    finally:
        pools.close()


def test_reflink_clone_on_xfs(xfs_reflink: Path, tmp_path: Path) -> None:
    pools = Pools({"xfs": str(xfs_reflink / "pool"), "ext4": str(tmp_path / "pool")})
    try:
        assert pools.pool("xfs").reflink and not pools.pool("ext4").reflink
        src = Path(pools.path_of("xfs", "base"))
        make_sparse(src, 20 * GiB, scatter(20 * GiB, 32, MiB))
        big = Path(pools.path_of("xfs", "huge"))
        with open(big, "wb") as f:
            f.truncate(200 * GiB)
        free = pools.pool("xfs").space()[1]
        result = pools.clone("xfs", "base", "xfs", "vm1")
        assert result.method == "reflink" and result.copied_bytes == 0
        assert result.seconds < 10  # about 1 ms (bench/bench_storage_clone.py): no copy
        assert pools.clone("xfs", "huge", "xfs", "huge2").method == "reflink"
        assert pools.pool("xfs").space()[1] >= free - 16 * MiB  # blocks are shared
        assert same_sparse_content(src, Path(result.volume.path))
        across = pools.clone("xfs", "base", "ext4", "vm2")  # another filesystem: a copy
        assert across.method == "copy"
        assert same_sparse_content(src, Path(across.volume.path))
        assert abs(across.volume.allocated_bytes - os.stat(src).st_blocks * 512) \
            <= os.stat(src).st_blocks * 512 / 100
    finally:
        pools.close()


def test_leftovers_of_a_crash_are_swept_at_start(tmp_path: Path) -> None:
    pool_dir = tmp_path / "pool"
    pool_dir.mkdir()
    for name in (".clone-1.part", ".create-2.part", ".xfer-orphan.part",
                 ".xfer-kept.json.new", "odd name"):
        (pool_dir / name).write_bytes(b"x")
    (pool_dir / ".xfer-kept.part").write_bytes(b"x")
    (pool_dir / ".xfer-kept.json").write_bytes(b"{}")
    pools = Pools({"default": str(pool_dir)})
    try:
        assert sorted(p.name for p in pool_dir.iterdir()) == [
            ".xfer-kept.json", ".xfer-kept.part", "odd name"]
        assert pools.volumes("default") == []  # a name the agent refuses is not a volume
    finally:
        pools.close()
