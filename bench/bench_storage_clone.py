"""Volume clone, ours against the user's tools, on the same files in the same run.

On ext4 (a sparse copy): ``Pools.clone`` (extents from SEEK_DATA/SEEK_HOLE moved with
``copy_file_range``, fsynced, linked into place) against ``cp --sparse=always`` and
``qemu-img convert -O raw`` of a 20 GiB virtual / 1 GiB allocated RAW file. On XFS with
reflink (a loop filesystem made here; needs root and xfsprogs): ``Pools.clone`` (FICLONE)
against ``cp --reflink=always`` at 20 GiB and 200 GiB virtual. Page cache warm; the best of
``--repeat`` runs counts.

Through the CLI as a user runs it (ext4): ``phyllome storage clone`` as a process against a
storage agent (its job, events and progress included), less the time of a ``phyllome storage
info`` of the same volume (Python's start-up and a round trip), on an 8 GiB volume with
512 MiB of data in six extents, against the same tools made durable.

    .venv/bin/python bench/bench_storage_clone.py                  # ext4 + XFS, as in the issue
    .venv/bin/python bench/bench_storage_clone.py --no-xfs --data 256M

Prints markdown table rows: | path | ours | alternative | ratio (alternative / ours) |.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import Result, loop_xfs  # noqa: E402
from services.storage.volumes import Pools  # noqa: E402
from shared.natsserver import NatsServer  # noqa: E402
from tests.support.agents import AgentProcess  # noqa: E402

MiB, GiB = 1 << 20, 1 << 30


def size_arg(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units \
        else int(text)


def make_volume(path: Path, virtual: int, data: int, extent: int = 8 * MiB) -> None:
    """``data`` bytes of random data in ``extent``-sized pieces scattered over ``virtual``."""
    rng = random.Random(7)
    slots = sorted(rng.sample(range(virtual // extent), max(1, data // extent)))
    block = os.urandom(min(extent, 8 * MiB))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.ftruncate(fd, virtual)
    for i, slot in enumerate(slots):
        piece = block[i % 64:] + block[: i % 64]
        for off in range(0, extent, len(piece)):
            os.pwrite(fd, piece[:extent - off], slot * extent + off)
    os.fsync(fd)
    os.close(fd)


def best(repeat: int, run: Callable[[], object], cleanup: Callable[[], object]) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
        cleanup()
    return min(times)


def tool(*argv: str, fsync: str = "") -> Callable[[], None]:
    """Run a command; with ``fsync``, then make that file durable as our clone does."""
    def run() -> None:
        subprocess.run(argv, check=True, capture_output=True)
        if fsync:
            fd = os.open(fsync, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)

    return run


def ours(pools: Pools, pool: str) -> tuple[Callable[[], object], Callable[[], object]]:
    return (lambda: pools.clone(pool, "src", pool, "dst"), lambda: pools.delete(pool, "dst"))


def ext4(work: Path, virtual: int, data: int, repeat: int) -> list[Result]:
    pools = Pools({"b": str(work / "pool")})
    src = work / "pool" / "src"
    make_volume(src, virtual, data)
    dst = work / "alt.raw"

    def rm() -> None:
        dst.unlink(missing_ok=True)

    mine = best(repeat, *ours(pools, "b"))
    pools.close()
    label = f"{virtual // GiB} GiB virtual / {data / GiB:.2g} GiB data, durable"
    rows = []
    cp = ["cp", "--sparse=always", str(src), str(dst)]
    qemu = ["qemu-img", "convert", "-f", "raw", "-O", "raw", str(src), str(dst)]
    for name, argv in (("cp --sparse=always", cp), ("qemu-img convert -O raw", qemu)):
        # As the tools run (no fsync: a crash may lose the copy), then made durable like ours.
        for suffix, sync in (("", ""), (" + fsync", str(dst))):
            alt = best(repeat, tool(*argv, fsync=sync), rm)
            rows.append(Result("clone on ext4 (sparse copy)", label, mine, alt,
                               f"{name}{suffix}", "s", "<= 1.0x the faster tool"))
    return rows


def through_cli(work: Path, repeat: int, virtual: int = 8 * GiB, data: int = 512 * MiB,
                extents: int = 6) -> list[Result]:
    """``phyllome storage clone`` against a storage agent, less ``phyllome storage info``."""
    server = NatsServer(work / "nats", port=-1)
    server.start()
    agent = AgentProcess("storage", server.url, work / "state", host="bench")
    try:
        asyncio.run(agent.start())
        pool = work / "state" / "pools" / "default"
        make_volume(pool / "src", virtual, data, extent=data // extents // MiB * MiB)
        env = {**os.environ, "PHYLLOME_NATS_URL": server.url, "PHYLLOME_HOST": "bench",
               "PYTHONPATH": str(REPO)}

        def phyllome(*args: str) -> Callable[[], object]:
            return lambda: subprocess.run([sys.executable, "-m", "cli.main", "storage", *args],
                                          env=env, check=True, capture_output=True)

        def rm() -> None:
            phyllome("delete", "dst")()

        clone = best(repeat, phyllome("clone", "src", "dst"), rm)
        info = best(repeat, phyllome("info", "src"), lambda: None)
        src, dst = pool / "src", work / "alt.raw"

        def rm_alt() -> None:
            dst.unlink(missing_ok=True)

        label = (f"`phyllome storage clone`, {virtual // GiB} GiB virtual / {data // MiB} MiB "
                 f"data in {extents} extents, less `storage info`")
        rows = []
        for name, argv in (("cp --sparse=always + fsync",
                            ["cp", "--sparse=always", str(src), str(dst)]),
                           ("qemu-img convert -O raw + fsync",
                            ["qemu-img", "convert", "-f", "raw", "-O", "raw", str(src),
                             str(dst)])):
            alt = best(repeat, tool(*argv, fsync=str(dst)), rm_alt)
            rows.append(Result("clone on ext4 through the CLI", label, clone - info, alt, name,
                               "s", "<= 1.0x the faster tool",
                               note=f"clone {clone:.3f} s, info {info:.3f} s"))
        return rows
    finally:
        agent.kill()
        server.stop()


def xfs(work: Path, repeat: int) -> list[Result]:
    rows = []
    with loop_xfs(work) as mnt:
        pools = Pools({"x": str(mnt / "pool")})
        for virtual in (20 * GiB, 200 * GiB):
            src = mnt / "pool" / "src"
            make_volume(src, virtual, 256 * MiB)
            dst = mnt / "alt.raw"
            mine = best(repeat, *ours(pools, "x"))
            cp = best(repeat, tool("cp", "--reflink=always", str(src), str(dst)), dst.unlink)
            src.unlink()
            rows.append(Result("clone on XFS (reflink)", f"{virtual // GiB} GiB virtual",
                               mine * 1000, cp * 1000, "cp --reflink=always", "ms",
                               "< 50 ms"))
        pools.close()
    return rows


def run(quick: bool = False, virtual: int = 20 * GiB, data: int = GiB, repeat: int = 3,
        with_xfs: bool = True, workdir: str = "/var/tmp") -> list[Result]:
    if quick:
        virtual, data, repeat = 4 * GiB, 256 * MiB, 2
    if not shutil.which("qemu-img"):
        raise SystemExit("qemu-img is needed (apt install qemu-utils)")
    with tempfile.TemporaryDirectory(dir=workdir, prefix="bench-clone-") as tmp:
        rows = ext4(Path(tmp), virtual, data, repeat)
        rows += through_cli(Path(tmp), repeat)
        if with_xfs:
            if os.geteuid() != 0 or not shutil.which("mkfs.xfs"):
                raise SystemExit("XFS rows need root and xfsprogs; pass --no-xfs")
            rows += xfs(Path(tmp), repeat)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--virtual", type=size_arg, default=20 * GiB)
    p.add_argument("--data", type=size_arg, default=GiB)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--no-xfs", action="store_true", help="skip the XFS reflink rows")
    p.add_argument("--dir", default="/var/tmp", help="an ext4 directory to work in")
    args = p.parse_args()
    for r in run(virtual=args.virtual, data=args.data, repeat=args.repeat,
                 with_xfs=not args.no_xfs, workdir=args.dir):
        print(r.row())


if __name__ == "__main__":
    main()
