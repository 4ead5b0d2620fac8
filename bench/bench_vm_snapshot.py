"""VM snapshots and backups, ours beside the user's tools on the same files in the same run.

- Snapshot of a running VM through the bus (``vm.snapshot_create``: the vm agent pauses the
  guest, reads its NVRAM and TPM state, the storage agent reflinks the disk and writes the
  snapshot durably, the guest resumes) on a loop XFS with reflink, its disk 20 GiB and 200 GiB
  virtual; beside ``cp --reflink=always`` of the same disk. libvirt's test driver stands in
  for QEMU (the pause and resume are libvirt calls either way).
- Backup: the storage agent's archive writer (``Snapshots.export``: extents only, sha256 of
  every member, zstd, fsync, rename) of a snapshot of 20 GiB virtual / 1 GiB data; beside
  ``tar --sparse -c | zstd`` of the same file (and that made durable with sync).
- Restore: ``Snapshots.import_`` of that archive (every sum checked, the disk written sparse
  and fsynced); beside ``zstd -d | tar -x --sparse`` (and that made durable).

    python -m bench.bench_vm_snapshot [--quick]
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.bench_storage_clone import make_volume
from bench.common import Result, loop_xfs
from services.storage.snapshots import Snapshots
from services.storage.volumes import Pools
from shared.messages import vm as vm_api
from shared.messages.storage import VolumeRef
from shared.messages.vm import Disk, VmCreate, VmRef, VmSnapshotCreate, VmSnapshotRef, VmSpec
from shared.natsserver import NatsServer

MiB, GiB = 1 << 20, 1 << 30
OWNER = "00000000-0000-4000-8000-00000000b0b0"


async def snapshot_times(root: Path, pool: Path, virtual: int, rounds: int) -> list[float]:
    """Seconds of each ``vm.snapshot_create`` of a running VM whose disk is ``virtual``."""
    from bench.bench_cluster_migrate import HOST_XML, start

    server = NatsServer(root / "nats", port=-1)
    server.start()
    try:
        async with contextlib.AsyncExitStack() as stack:
            (root / "host.xml").write_text(HOST_XML)
            await start(stack, "storage", server.url, root, "h1",
                        extra={"pools": {"default": str(pool)}})
            vm = await start(stack, "vm", server.url, root, "h1",
                             libvirt_uri=f"test://{root / 'host.xml'}", accelerator="tcg",
                             extra={"reconcile_s": 3600, "libvirt_dir": str(root / "libvirt")})
            make_volume(pool / "b-disk0", virtual, 256 * MiB)
            await vm.bus.call("h1", vm_api.CREATE, VmCreate(spec=VmSpec(
                name="b", memory_mib=64, display="none", secure_boot=True, tpm="emulated-2.0",
                disks=[Disk(volume="b-disk0", owned=True)])))
            await vm.bus.call("h1", vm_api.START, VmRef(vm="b"))
            times = []
            for i in range(rounds):
                t = time.perf_counter()
                snap = await vm.bus.call("h1", vm_api.SNAPSHOT_CREATE,
                                         VmSnapshotCreate(vm="b", name=f"s{i}"))
                times.append(time.perf_counter() - t)
                assert snap.method == "reflink", snap
            for i in range(rounds):
                await vm.bus.call("h1", vm_api.SNAPSHOT_DELETE, VmSnapshotRef(vm="b",
                                                                              name=f"s{i}"))
            await vm.bus.call("h1", vm_api.DELETE, vm_api.VmDelete(vm="b", force=True,
                                                                   delete_disks=True))
        return times
    finally:
        server.stop()


def cp_reflink(pool: Path, virtual: int, rounds: int) -> float:
    src, dst = pool / "cp-src", pool / "cp-dst"
    make_volume(src, virtual, 256 * MiB)
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        subprocess.run(["cp", "--reflink=always", str(src), str(dst)], check=True)
        times.append(time.perf_counter() - t)
        dst.unlink()
    src.unlink()
    return statistics.median(times)


async def snapshots_on_xfs(work: Path, rounds: int) -> list[Result]:
    rows = []
    with loop_xfs(work) as mnt:
        for virtual in (20 * GiB, 200 * GiB):
            root = work / f"agents-{virtual // GiB}"
            root.mkdir()
            times = await snapshot_times(root, mnt / f"pool-{virtual // GiB}", virtual, rounds)
            cp = cp_reflink(mnt, virtual, rounds)
            mine = statistics.median(times)
            rows.append(Result(
                "vm snapshot on XFS (through the bus)",
                f"running VM, {virtual // GiB} GiB virtual disk, median of {rounds}",
                mine * 1000, cp * 1000, "cp --reflink=always of the disk", "ms",
                "< 50 ms, flat 20 -> 200 GiB",
                note=f"p90 {sorted(times)[int(0.9 * (len(times) - 1))] * 1000:.1f} ms; ours: "
                     "pause, NVRAM + TPM read, reflink, fsyncs, resume"))
    return rows


def sh(script: str) -> None:
    subprocess.run(["bash", "-o", "pipefail", "-c", script], check=True, capture_output=True)


def cpu_now() -> tuple[float, float]:
    """CPU seconds (user + system) of this process and of its finished children."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


class Alternating:
    """Runs each contender in turn, ``repeat`` rounds (the machine's load then falls on all
    of them alike); keeps every wall time and CPU time."""

    def __init__(self) -> None:
        self.wall: dict[str, list[float]] = {}
        self.cpu: dict[str, list[float]] = {}
        self.loads: list[float] = []

    def run(self, name: str, work: Callable[[], object],
            cleanup: Callable[[], object] = lambda: None) -> None:
        cpu = cpu_now()
        started = time.perf_counter()
        work()
        self.wall.setdefault(name, []).append(time.perf_counter() - started)
        after = cpu_now()
        self.cpu.setdefault(name, []).append(after[0] - cpu[0] + after[1] - cpu[1])
        self.loads.append(os.getloadavg()[0])
        cleanup()

    def best(self, name: str) -> float:
        return min(self.wall[name])

    def cpu_of_best(self, name: str) -> float:
        return self.cpu[name][self.wall[name].index(self.best(name))]

    def spread(self, name: str) -> str:
        return "/".join(f"{t:.2f}" for t in self.wall[name])


def backups(work: Path, virtual: int, data: int, repeat: int) -> list[Result]:
    pools = Pools({"b": str(work / "pool")})
    snaps = Snapshots(pools)
    make_volume(work / "pool" / "src", virtual, data)
    snaps.take("b", OWNER, "s", [VolumeRef(pool="b", name="src")], {"vm.json": b"{}"}, {})
    out = work / "out"
    out.mkdir()
    archive: list[str] = []

    def export() -> None:
        for old in archive:
            os.unlink(old)
        result = snaps.export("b", OWNER, "s", str(out), "bench-", host="h1")
        archive[:] = [str(result["archive"])]

    theirs_tar = work / "theirs.tar.zst"
    src_dir = work / "pool"
    tar = f"tar --sparse -cf - -C {src_dir} src | zstd -q -f -o {theirs_tar}"
    runs = Alternating()
    for _ in range(repeat):
        runs.run("ours", export)
        runs.run("tar", lambda: sh(tar))
        runs.run("tar+sync", lambda: sh(f"{tar} && sync {theirs_tar}"))
    size, their_size = os.stat(archive[0]).st_size, theirs_tar.stat().st_size
    label = f"{virtual // GiB} GiB virtual / {data / GiB:.2g} GiB data, durable"
    how = (f"best of {repeat}, run in turn; load {min(runs.loads):.0f}-{max(runs.loads):.0f}")
    rows = [Result("vm backup (archive write)", label, runs.best("ours"), runs.best("tar"),
                   "tar --sparse -c | zstd", "s", ">= 1.0x",
                   note=f"{how}; archive {size / their_size:.4f}x the tar.zst's size; CPU s "
                        f"ours {runs.cpu_of_best('ours'):.2f}, theirs "
                        f"{runs.cpu_of_best('tar'):.2f}; all runs s: ours "
                        f"{runs.spread('ours')}, theirs {runs.spread('tar')}"),
            Result("vm backup (archive write)", label, runs.best("ours"),
                   runs.best("tar+sync"), "tar --sparse -c | zstd + sync", "s", ">= 1.0x",
                   note=f"CPU s theirs {runs.cpu_of_best('tar+sync'):.2f}; all runs s: "
                        f"theirs {runs.spread('tar+sync')}")]

    def restore() -> None:
        snaps.import_(archive[0], "b", "restore-bench", "r", {})

    def drop() -> None:
        snaps.delete("b", "restore-bench")

    dest = work / "theirs-x"
    untar = f"rm -rf {dest} && mkdir {dest} && zstd -dc {theirs_tar} | tar -x --sparse -C {dest}"
    back = Alternating()
    for _ in range(repeat):
        back.run("ours", restore, drop)
        back.run("untar", lambda: sh(untar))
        back.run("untar+sync", lambda: sh(f"{untar} && sync {dest}/src"))
    how = (f"best of {repeat}, run in turn; load {min(back.loads):.0f}-{max(back.loads):.0f}")
    rows += [Result("vm restore (archive read)", label, back.best("ours"), back.best("untar"),
                    "zstd -d | tar -x --sparse", "s", ">= 1.0x",
                    note=f"{how}; ours checks every sha256 before the snapshot appears, "
                         f"fsynced; CPU s ours {back.cpu_of_best('ours'):.2f}, theirs "
                         f"{back.cpu_of_best('untar'):.2f}; all runs s: ours "
                         f"{back.spread('ours')}, theirs {back.spread('untar')}"),
             Result("vm restore (archive read)", label, back.best("ours"),
                    back.best("untar+sync"), "zstd -d | tar -x --sparse + sync", "s",
                    ">= 1.0x", note=f"CPU s theirs {back.cpu_of_best('untar+sync'):.2f}; all "
                                    f"runs s: theirs {back.spread('untar+sync')}")]
    pools.close()
    return rows


async def run(quick: bool = False, workdir: str = "/var/tmp") -> list[Result]:
    virtual, data, repeat, rounds = (4 * GiB, 256 * MiB, 2, 10) if quick else (
        20 * GiB, GiB, 5, 30)
    for tool in ("zstd", "tar"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is needed for the comparison")
    rows: list[Result] = []
    with tempfile.TemporaryDirectory(dir=workdir, prefix="bench-snap-") as tmp:
        if os.geteuid() == 0 and shutil.which("mkfs.xfs"):
            (Path(tmp) / "xfs-work").mkdir()
            rows += await snapshots_on_xfs(Path(tmp) / "xfs-work", rounds)
        (Path(tmp) / "backup").mkdir()
        rows += await asyncio.to_thread(backups, Path(tmp) / "backup", virtual, data, repeat)
    return rows


if __name__ == "__main__":
    for r in asyncio.run(run("--quick" in sys.argv)):
        print(r.row())
