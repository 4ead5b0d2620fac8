"""What every benchmark shares: timing, percentiles, and the row it reports.

Each ``bench/bench_*.py`` has ``async def run(quick: bool) -> list[Result]`` (or a sync
``run``) and can be run alone: ``python -m bench.bench_bus``. ``python -m bench.run`` runs
them all and writes docs/benchmarks.md.
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Result:
    """One comparison: our path against the tool a user would use instead, same run."""

    bench: str
    metric: str
    ours: float
    theirs: float
    baseline: str
    unit: str
    target: str
    higher_is_better: bool = False
    note: str = ""

    @property
    def ratio(self) -> float:
        """ours / theirs for times, theirs / ours for rates: below 1.0 we are slower."""
        if self.ours == 0 or self.theirs == 0:
            return float("nan")
        return self.ours / self.theirs if self.higher_is_better else self.theirs / self.ours

    def row(self) -> str:
        def cell(text: str) -> str:  # a shell pipe in a name must not split the table
            return text.replace("|", "\\|")

        return (f"| {cell(self.bench)} | {cell(self.metric)} | {self.ours:,.3f} {self.unit} | "
                f"{self.theirs:,.3f} {self.unit} ({cell(self.baseline)}) | {self.ratio:.2f}x | "
                f"{cell(self.target)} | {cell(self.note)} |")


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a running process has used so far (from /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine() -> str:
    """One line naming the machine the numbers came from."""
    cpu = platform.processor() or "cpu"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    kernel = platform.release()
    try:
        fs = subprocess.run(["df", "-T", "/var/tmp"], capture_output=True, text=True).stdout
        fstype = fs.splitlines()[-1].split()[1]
    except (OSError, IndexError):
        fstype = "?"
    return (f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, Linux {kernel}, "
            f"/var/tmp on {fstype}")


@contextlib.contextmanager
def loop_xfs(work: Path, size: int = 4 << 30) -> Iterator[Path]:
    """A fresh XFS with reflink on a loop file under ``work``, mounted while in use (root)."""
    image, mnt = work / "xfs.img", work / "xfs"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(size)
    subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
