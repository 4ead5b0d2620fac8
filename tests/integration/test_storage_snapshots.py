"""Snapshots in real pools: reflink on a loop XFS, sparse copies elsewhere, crash recovery,
and backup archives written to and read from real directories (one that fills up)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import msgspec
import pytest

from services.storage import snapshots as snapmod
from services.storage.snapshots import Snapshots
from services.storage.volumes import Pools
from shared.errors import BadRequest, Conflict, InsufficientResources, InvalidName, NotFound
from shared.messages.storage import VolumeRef
from tests.support.loopfs import make_sparse, same_sparse_content

pytestmark = pytest.mark.integration

MiB = 1 << 20
OWNER = "0b7e2f7a-6d7e-4c55-9f3e-1c2d3e4f5a6b"


def volume(pools: Pools, pool: str, name: str, size: int = 64 * MiB,
           data: list[tuple[int, int]] | None = None, seed: int = 1) -> Path:
    path = Path(pools.pool(pool).file_path(name))
    make_sparse(path, size, data if data is not None else [(MiB, 64 << 10), (32 * MiB, 4096)],
                seed=seed)
    return path


def scribble(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(MiB)
        f.write(b"changed after the snapshot" * 100)


def test_snapshot_reflinks_on_xfs_copies_elsewhere_and_reverts_every_pool(
        xfs_reflink: Path, tmp_path: Path) -> None:
    pools = Pools({"fast": str(xfs_reflink / "pool"), "slow": str(tmp_path / "slow")})
    snaps = Snapshots(pools)
    a = volume(pools, "fast", "web-disk0", 20 << 30, [(0, MiB), (10 << 30, MiB)])
    b = volume(pools, "slow", "web-disk1", seed=2)
    keep_a, keep_b = tmp_path / "a.orig", tmp_path / "b.orig"  # the same bytes, to compare
    make_sparse(keep_a, 20 << 30, [(0, MiB), (10 << 30, MiB)])
    make_sparse(keep_b, 64 * MiB, [(MiB, 64 << 10), (32 * MiB, 4096)], seed=2)

    info = snaps.take("fast", OWNER, "s1", [VolumeRef(pool="fast", name="web-disk0"),
                                            VolumeRef(pool="slow", name="web-disk1")],
                      {"nvram.fd": b"vars"}, {"vm": "web"})
    assert [(d.pool, d.method) for d in info.disks] == [("fast", "reflink"), ("slow", "copy")]
    assert info.seconds < 1.0  # 20 GiB virtual: a reflink, not a copy
    assert [i.name for i in snaps.find(owner=OWNER)] == ["s1"]
    assert snaps.used_bytes("slow") >= 64 << 10
    with pytest.raises(Conflict, match="has a snapshot 's1' already"):
        snaps.take("fast", OWNER, "s1", [], {}, {})

    scribble(a)
    b.unlink()  # deleted since: the revert makes it again
    snaps.restore("fast", OWNER, "s1")
    assert same_sparse_content(a, keep_a) and same_sparse_content(b, keep_b)
    assert snaps.read("fast", OWNER, "s1")[1] == {"nvram.fd": b"vars"}
    assert not [e for e in os.listdir(pools.pool("fast").path) if e.startswith(".restore")]

    assert snaps.delete("fast", OWNER, "s1") == ["s1"]
    for pool in ("fast", "slow"):
        top = Path(pools.pool(pool).path) / snapmod.TOP
        assert not top.exists() or os.listdir(top) == []
    with pytest.raises(NotFound, match="no snapshot 's1'"):
        snaps.restore("fast", OWNER, "s1")
    pools.close()


def test_bad_names_and_files_are_refused(tmp_path: Path) -> None:
    pools = Pools({"default": str(tmp_path / "pool")})
    snaps = Snapshots(pools)
    volume(pools, "default", "d0")
    disk = [VolumeRef(name="d0")]
    for owner, name, files, error, match in [
        ("../etc", "s", {}, InvalidName, "owner"),
        (OWNER, ".hidden", {}, InvalidName, "snapshot name"),
        (OWNER, "a/b", {}, InvalidName, "snapshot name"),
        (OWNER, "s", {"../x": b""}, InvalidName, "file name"),
        (OWNER, "s", {"big": bytes(9 << 20)}, BadRequest, "at most"),
    ]:
        with pytest.raises(error, match=match):
            snaps.take("default", owner, name, disk, files, {})
    with pytest.raises(BadRequest, match="listed twice"):
        snaps.take("default", OWNER, "s", disk * 2, {}, {})
    with pytest.raises(NotFound, match="no volume 'missing'"):
        snaps.take("default", OWNER, "s", [VolumeRef(name="missing")], {}, {})
    assert snaps.find() == []
    assert os.listdir(tmp_path / "pool" / snapmod.TOP / OWNER) == []  # nothing half made
    pools.close()


def test_a_restore_cut_by_a_crash_is_finished_and_leftovers_go_at_start(
        tmp_path: Path) -> None:
    pools = Pools({"default": str(tmp_path / "pool")})
    snaps = Snapshots(pools)
    d0, d1 = volume(pools, "default", "d0"), volume(pools, "default", "d1", seed=3)
    orig0, orig1 = d0.read_bytes(), d1.read_bytes()
    info = snaps.take("default", OWNER, "s1", [VolumeRef(name="d0"), VolumeRef(name="d1")],
                      {}, {})
    snaps.take("default", OWNER, "tmp", [VolumeRef(name="d0")], {}, {"temporary": "yes"})
    scribble(d0)
    scribble(d1)
    # The state a crash leaves after the rename list was written and d0 was renamed:
    folder = Path(pools.pool("default").path)
    src = os.open(folder / snapmod.TOP / OWNER / "s1" / "disks", os.O_RDONLY)
    pending = [snaps._prepare(src, disk, pools.pool("default"), "restore")
               for disk in info.disks]
    os.close(src)
    renames = [("default", pending[0], "d0"), ("default", pending[1], "d1")]
    (folder / snapmod.TOP / OWNER / snapmod.JOURNAL).write_bytes(
        msgspec.json.encode(snapmod._Journal(renames=renames)))
    os.rename(folder / pending[0], d0)
    # ... and what other crashes leave: a half-taken snapshot, an unlisted prepared copy.
    (folder / snapmod.TOP / OWNER / ".s2.part-1234").mkdir()
    (folder / f".restore-{secrets.token_hex(8)}.pending").write_bytes(b"x")
    pools.close()

    pools = Pools({"default": str(tmp_path / "pool")})
    snaps = Snapshots(pools)
    assert d0.read_bytes() == orig0 and d1.read_bytes() == orig1
    assert sorted(os.listdir(folder / snapmod.TOP / OWNER)) == ["s1"]  # temporary one gone
    assert [e for e in os.listdir(folder) if e.startswith(".restore")] == []
    pools.close()


def test_archive_round_trip_prunes_and_refuses_what_it_must(tmp_path: Path) -> None:
    pools = Pools({"default": str(tmp_path / "pool")})
    snaps = Snapshots(pools)
    d0 = volume(pools, "default", "d0", 256 * MiB, [(0, MiB), (200 * MiB, 3 * MiB)])
    snaps.take("default", OWNER, "s1", [VolumeRef(name="d0")], {"vm.json": b"{}"},
               {"temporary": "yes"})
    backups = tmp_path / "backups"
    backups.mkdir()
    written = [snaps.export("default", OWNER, "s1", str(backups), "web-", host="h1", keep=2)
               for _ in range(3)]
    names = sorted(os.listdir(backups))
    assert names == sorted(Path(str(w["archive"])).name for w in written[1:])
    assert written[2]["removed"] == [Path(str(written[0]["archive"])).name]
    assert int(str(written[0]["bytes"])) < 8 * MiB  # holes are not in the archive

    info = snaps.import_(str(written[2]["archive"]), "default", "restore-1", "staged", {})
    assert "temporary" not in info.labels  # a backup's own snapshot label is not carried
    assert info.files == {"vm.json": 2}
    made = snaps.restore("default", "restore-1", "staged", [VolumeRef(name="copy")], move=True)
    assert same_sparse_content(Path(made[0].path), d0)
    assert [i.owner for i in snaps.find()] == [OWNER]  # moved out: the staged one is gone

    for directory, error, match in [("relative", BadRequest, "absolute path"),
                                    (str(tmp_path / "missing"), NotFound, "does not exist"),
                                    (str(d0), BadRequest, "not a directory")]:
        with pytest.raises(error, match=match):
            snaps.export("default", OWNER, "s1", directory, "web-", host="h1")
    with pytest.raises(BadRequest, match="archive prefix"):
        snaps.export("default", OWNER, "s1", str(backups), "../x", host="h1")
    with pytest.raises(NotFound, match="no archive"):
        snaps.import_(str(tmp_path / "nope.phybak"), "default", "r2", "staged", {})
    damaged = bytearray(Path(str(written[2]["archive"])).read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    (tmp_path / "bad.phybak").write_bytes(bytes(damaged))
    before = sorted(os.listdir(tmp_path / "pool"))
    with pytest.raises(BadRequest, match="damaged|not valid"):
        snaps.import_(str(tmp_path / "bad.phybak"), "default", "r2", "staged", {})
    assert sorted(os.listdir(tmp_path / "pool")) == before
    assert snaps.find(owner="r2") == []
    assert not (tmp_path / "pool" / snapmod.TOP / "r2").exists()  # not even its folder
    pools.close()


def test_a_backup_dir_that_fills_up_keeps_no_archive(small_ext4: Path, tmp_path: Path) -> None:
    pools = Pools({"default": str(tmp_path / "pool")})
    snaps = Snapshots(pools)
    volume(pools, "default", "d0", 256 * MiB, [(0, 96 * MiB)])  # random: incompressible
    snaps.take("default", OWNER, "s1", [VolumeRef(name="d0")], {}, {})
    with pytest.raises(InsufficientResources, match="ran out of space.*partial archive was "
                                                    "removed"):
        snaps.export("default", OWNER, "s1", str(small_ext4), "web-", host="h1")
    assert [e for e in os.listdir(small_ext4) if e != "lost+found"] == []
    pools.close()
