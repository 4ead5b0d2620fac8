"""Catalogue pull: download + sha256 + qcow2 -> RAW, ours against the shell pipeline.

Ours is ``ImageStore.pull`` (hashing while streaming, the write and the hash of one block
overlapped with reading the next, then ``qemu-img convert`` and the RAW's sha256). The
user's alternative is ``curl URL | tee img.qcow2 | sha256sum`` followed by
``qemu-img convert -O raw``. Both fetch the same qcow2 from the same loopback HTTP server
in the same run, alternately; the best of ``--repeat`` runs counts.

    .venv/bin/python bench/bench_catalogue_pull.py --size 256M    # quick
    .venv/bin/python bench/bench_catalogue_pull.py                # 2 GiB, as in the issue

Prints one markdown table row: | path | ours | alternative | ratio (alternative / ours) |.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import Result  # noqa: E402
from services.catalogue.config import Settings  # noqa: E402
from services.catalogue.download import ImageStore  # noqa: E402
from shared.messages.catalogue import CatalogueEntry, Download  # noqa: E402

MiB = 1 << 20


def size_arg(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units \
        else int(text)


def make_qcow2(work: Path, size: int) -> Path:
    """A qcow2 whose clusters are all allocated: 3/4 incompressible data, 1/4 zeros."""
    raw = work / "src.raw"
    with raw.open("wb") as f:
        block = os.urandom(4 * MiB)
        for i in range(size // len(block)):
            f.write(block if i % 4 else bytes(len(block)) if i % 8 == 0 else
                    hashlib.sha512(block[:64] + bytes([i % 256])).digest() * (len(block) // 64))
    qcow = work / "www" / "disk.qcow2"
    qcow.parent.mkdir()
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow)],
                   check=True)
    raw.unlink()
    return qcow


async def ours(url: str, digest: str, size: int, pool: Path) -> float:
    store = ImageStore(Settings(pool_dir=str(pool), builtin_dir=str(pool)), host="bench")

    async def progress(done: int, total: int, message: str) -> None:
        pass

    dl = Download(arch="x86_64", url=url, format="qcow2", sha256=digest, size=size)
    entry = CatalogueEntry(id="bench", name="bench", source="bench", downloads=[dl])
    started = time.perf_counter()
    try:
        await store.pull(entry, dl, allow_unverified=False, progress=progress)
        return time.perf_counter() - started
    finally:
        store.remove("bench")
        await store.close()


def alternative(url: str, digest: str, work: Path) -> float:
    qcow, raw = work / "alt.qcow2", work / "alt.raw"
    started = time.perf_counter()
    out = subprocess.run(f"curl -sf {url} | tee {qcow} | sha256sum", shell=True, check=True,
                         capture_output=True, text=True).stdout
    if out.split()[0] != digest:
        raise SystemExit("curl pipeline: checksum mismatch")
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(qcow), str(raw)],
                   check=True)
    took = time.perf_counter() - started
    qcow.unlink()
    raw.unlink()
    return took


def run(quick: bool = False, size: int = 2 << 30, repeat: int = 3,
        workdir: str | None = None) -> list[Result]:
    size = 256 * MiB if quick else size
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        work = Path(tmp)
        qcow = make_qcow2(work, size)
        digest = hashlib.sha256(qcow.read_bytes()).hexdigest()
        # the server runs in its own process, as a real one would: no GIL shared with ours
        server = subprocess.Popen([sys.executable, "-m", "tests.support.httpserver",
                                   str(qcow.parent)], cwd=REPO, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout is not None
            url = f"http://127.0.0.1:{int(server.stdout.readline())}/disk.qcow2"
            mine, theirs = [], []
            for _ in range(repeat):
                mine.append(asyncio.run(ours(url, digest, qcow.stat().st_size, work / "pool")))
                theirs.append(alternative(url, digest, work))
        finally:
            server.communicate("")
    label = f"{size / (1 << 30):g} GiB" if size >= 1 << 30 else f"{size // MiB} MiB"
    return [Result("catalogue pull + verify + convert", f"{label} qcow2, loopback HTTP, best "
                   f"of {repeat}", min(mine), min(theirs),
                   "curl | tee | sha256sum; qemu-img convert", "s", ">= 1.2x")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=size_arg, default=2 << 30, help="virtual size (2G)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dir", default=None, help="work directory (default: a temp dir)")
    args = p.parse_args()
    for r in run(size=args.size, repeat=args.repeat, workdir=args.dir):
        print(r.row())


if __name__ == "__main__":
    main()
