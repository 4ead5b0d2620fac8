"""Volume transfer between two storage agents over loopback NATS, against the user's tools.

Ours: two storage agents (hosts b1 and b2, real ``python -m services.storage`` processes)
on one embedded nats-server (max_payload 8 MiB); ``send`` of a sparse RAW volume from b1 to
b2, timed from the request to the job's end (digest check and fsync included). The
alternatives, in the same run on the same file: ``rsync --sparse`` (local, sender and
receiver processes over a pipe) and a raw pipe of the same allocated bytes through
``socat`` over TCP loopback (no holes, no checksum: the wire speed floor).

    .venv/bin/python bench/bench_storage_transfer.py --virtual 20G --data 1G
    .venv/bin/python bench/bench_storage_transfer.py --virtual 4G --data 256M --no-rsync

Prints markdown table rows: | path | ours | alternative | ratio (alternative / ours) |.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import Result, cpu_seconds  # noqa: E402
from shared.bus import Bus  # noqa: E402
from shared.jobs import wait_job  # noqa: E402
from shared.messages import storage as storage_api  # noqa: E402
from shared.messages.storage import SendVolume, VolumeRef  # noqa: E402
from shared.natsserver import NatsServer  # noqa: E402

MiB = 1 << 20


def size_arg(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units \
        else int(text)


def make_volume(path: Path, virtual: int, data: int, extent: int = 8 * MiB) -> None:
    """``data`` bytes of random data in ``extent``-sized pieces scattered over ``virtual``."""
    rng = random.Random(7)
    count = max(1, data // extent)
    slots = sorted(rng.sample(range(virtual // extent), count))
    block = os.urandom(extent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.ftruncate(fd, virtual)
    for i, slot in enumerate(slots):
        os.pwrite(fd, block[i % 64:] + block[: i % 64], slot * extent)
    os.fsync(fd)
    os.close(fd)


def agent(host: str, url: str, state: Path, chunk: int, window: int) -> subprocess.Popen[bytes]:
    conf = state / "phyllome.toml"
    conf.write_text(f"[storage]\nchunk_bytes = {chunk}\nwindow = {window}\n")
    env = {**os.environ, "PHYLLOME_HOST": host, "PHYLLOME_NATS_URL": url,
           "PHYLLOME_STATE_DIR": str(state), "PHYLLOME_STORAGE_METRICS_PORT": "0",
           "PHYLLOME_LOG_LEVEL": "WARNING", "PHYLLOME_CONFIG": str(conf)}
    return subprocess.Popen([sys.executable, "-m", "services.storage"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=open(state / "agent.log", "wb"))


async def ours(work: Path, src: Path, repeat: int, chunk: int,
               window: int) -> tuple[float, int, list[float]]:
    """Best time, wire bytes, and CPU seconds (sender, nats-server, receiver) of the best run."""
    server = NatsServer(work / "nats", port=-1)
    server.start()
    procs = []
    try:
        for host in ("b1", "b2"):
            (work / host / "pools" / "default").mkdir(parents=True, exist_ok=True)
            procs.append(agent(host, server.url, work / host, chunk, window))
        os.link(src, work / "b1" / "pools" / "default" / "vol")
        bus = await Bus.connect(server.url, name="bench", host="b1", give_up_after=10)
        best, wire, cpu = float("inf"), 0, [0.0, 0.0, 0.0]
        assert server.proc is not None
        pids = [procs[0].pid, server.proc.pid, procs[1].pid]
        try:
            for host in ("b1", "b2"):
                await wait_ping(bus, host)
            for _ in range(repeat):
                before = [cpu_seconds(pid) for pid in pids]
                started = time.perf_counter()
                acc = await bus.call("b1", storage_api.SEND, SendVolume(name="vol",
                                                                         to_host="b2"))
                st = await wait_job(bus, "b1", "storage", acc, timeout=600)
                took = time.perf_counter() - started
                if st.state != "succeeded":
                    raise SystemExit(f"send {st.state}: {st.message}")
                if took < best:
                    best, wire = took, int(str(st.result["wire_bytes"]))
                    cpu = [cpu_seconds(pid) - b for pid, b in zip(pids, before, strict=True)]
                await bus.call("b2", storage_api.DELETE, VolumeRef(name="vol"))
        finally:
            await bus.close()
        return best, wire, cpu
    finally:
        for p in procs:
            p.terminate()
            p.wait()
        server.stop()


async def wait_ping(bus: Bus, host: str) -> None:
    from shared.messages import Empty

    deadline = time.monotonic() + 30
    while True:
        try:
            await bus.call(host, storage_api.POOLS, Empty(), timeout=1)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


def rsync(src: Path, work: Path) -> float:
    dst = work / "rsync-dst"
    started = time.perf_counter()
    subprocess.run(["rsync", "--sparse", str(src), str(dst)], check=True)
    took = time.perf_counter() - started
    dst.unlink()
    return took


def socat(src: Path, work: Path, repeat: int) -> tuple[float, float]:
    """The allocated bytes, densely, through socat over TCP loopback into a file: the best
    time, and the CPU seconds of both socat processes in that run."""
    dense = work / "dense"
    fd_in = os.open(src, os.O_RDONLY)
    with open(dense, "wb") as out:
        size = os.fstat(fd_in).st_size
        off = 0
        while off < size:
            try:
                start = os.lseek(fd_in, off, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd_in, start, os.SEEK_HOLE)
            out.write(os.pread(fd_in, end - start, start))
            off = end
    os.close(fd_in)
    best, cpu = float("inf"), 0.0
    for _ in range(repeat):
        used = resource.getrusage(resource.RUSAGE_CHILDREN)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        started = time.perf_counter()
        recv = subprocess.Popen(["socat", "-u", f"TCP-LISTEN:{port},reuseaddr",
                                 f"CREATE:{work / 'socat-dst'}"])
        while subprocess.run(["socat", "-u", f"FILE:{dense}", f"TCP:127.0.0.1:{port}"],
                             capture_output=True).returncode != 0:
            if time.perf_counter() - started > 10:
                raise SystemExit("socat receiver did not start")
        recv.wait()
        took = time.perf_counter() - started
        now = resource.getrusage(resource.RUSAGE_CHILDREN)
        if took < best:
            best = took
            cpu = now.ru_utime + now.ru_stime - used.ru_utime - used.ru_stime
        (work / "socat-dst").unlink()
    dense.unlink()
    return best, cpu


def run(quick: bool = False, virtual: int = 20 << 30, data: int = 1 << 30, repeat: int = 3,
        chunk: int = 4 * MiB, window: int = 8, with_rsync: bool = True,
        workdir: str = "/var/tmp") -> list[Result]:
    if quick:
        virtual, data, repeat, with_rsync = 4 << 30, 256 * MiB, 2, False
    for tool in ("socat", "rsync"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is needed (apt install {tool})")
    with tempfile.TemporaryDirectory(dir=workdir, prefix="bench-transfer-") as tmp:
        work = Path(tmp)
        src = work / "src.raw"
        make_volume(src, virtual, data)
        allocated = os.stat(src).st_blocks * 512
        mine, wire, cpu = asyncio.run(ours(work, src, repeat, chunk, window))
        pipe, pipe_cpu = socat(src, work, repeat)
        label = (f"{virtual >> 30} GiB virtual / {data / (1 << 30):.2g} GiB data, chunk "
                 f"{chunk // MiB} MiB x {window}")
        note = (f"{allocated / mine / MiB:.0f} MiB/s; wire {wire / allocated:.3f}x allocated; "
                f"CPU s: sender {cpu[0]:.2f}, nats-server {cpu[1]:.2f}, receiver "
                f"{cpu[2]:.2f}, socat {pipe_cpu:.2f}")
        rows = [Result("transfer between agents (loopback)", label, mine, pipe,
                       "socat raw pipe", "s", ">= 0.9x the pipe", note=note)]
        if with_rsync:
            rows.append(Result("transfer between agents (loopback)", label, mine,
                               rsync(src, work), "rsync --sparse", "s", ">= 10x rsync"))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--virtual", type=size_arg, default=20 << 30)
    p.add_argument("--data", type=size_arg, default=1 << 30)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--chunk", type=size_arg, default=4 * MiB, help="[storage] chunk_bytes")
    p.add_argument("--window", type=int, default=8, help="[storage] window")
    p.add_argument("--no-rsync", action="store_true", help="skip rsync (about 2 min at 20 GiB)")
    p.add_argument("--dir", default="/var/tmp", help="an ext4 directory to work in")
    args = p.parse_args()
    for r in run(virtual=args.virtual, data=args.data, repeat=args.repeat, chunk=args.chunk,
                 window=args.window, with_rsync=not args.no_rsync, workdir=args.dir):
        print(r.row())


if __name__ == "__main__":
    main()
