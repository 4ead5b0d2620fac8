"""Hardware inventory: full scan + report of a 2,000-device tree, ours against lspci.

Ours is what `phyllome hw report --json` does (pci.ids read afresh, every device read,
names, IOMMU groups, verdicts, GPU view, JSON) in this process; the user's alternative is
``lspci -nnk -A linux-sysfs -O sysfs.path=DIR/bus/pci`` (a fresh process) on the same tree,
alternately in the same run; the median of ``--repeat`` runs counts. Also: our whole CLI as
a process (Python start-up included), both ways it answers: from the host's hardware agent
(what `phyllome hw report` does on a host that runs one: the agent, on the same tree, keeps
its inventory current from uevents) and scanning the tree itself (``--sysfs-root``, as with
no agent); and the time a uevent takes to update the inventory for one device (the median
of 500 updates).

    .venv/bin/python bench/bench_hw_scan.py            # 2,000 devices, as in the issue

Prints markdown table rows: | path | ours | alternative | ratio (ours / alternative) |.
"""

from __future__ import annotations

import argparse
import compileall
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import asyncio  # noqa: E402

from bench.common import Result  # noqa: E402
from services.hardware import pciids  # noqa: E402
from services.hardware.inventory import Inventory, host_caps  # noqa: E402
from services.hardware.sysfs import Sysfs  # noqa: E402
from shared.codec import encode  # noqa: E402
from shared.natsserver import NatsServer  # noqa: E402
from tests.support.agents import AgentProcess  # noqa: E402
from tests.support.sysfs_tree import Host, Pci, build  # noqa: E402

# (vendor, device, class, driver) of the functions of one card, cycled over the slots
CARDS = [
    [(0x10DE, 0x1F02, 0x030000, "nvidia"), (0x10DE, 0x10F9, 0x040300, "snd_hda_intel"),
     (0x10DE, 0x1ADA, 0x0C0330, "xhci_hcd"), (0x10DE, 0x1ADB, 0x0C8000, "nvidia-gpu")],
    [(0x8086, 0x10FB, 0x020000, "ixgbe"), (0x8086, 0x10FB, 0x020000, "ixgbe")],
    [(0x144D, 0xA808, 0x010802, "nvme")],
    [(0x1002, 0x73BF, 0x030000, "amdgpu"), (0x1002, 0xAB28, 0x040300, "snd_hda_intel")],
    [(0x15B3, 0x1017, 0x020000, "mlx5_core")],
]


def big_host(n: int) -> Host:
    """``n`` functions: root ports, each with one card behind it, one group per card."""
    devices: list[Pci] = []
    bus = group = 0
    while len(devices) < n:
        bus += 1
        group += 1
        port = f"0000:00:{bus % 32:02x}.{bus // 32 % 8}" if bus < 256 else None
        if port is None:
            break
        devices.append(Pci(addr=port, vendor=0x8086, device=0x1901, cls=0x060400,
                           driver="pcieport", group=group))
        for fn, (v, d, c, drv) in enumerate(CARDS[bus % len(CARDS)]):
            if len(devices) >= n:
                break
            devices.append(Pci(addr=f"0000:{bus:02x}:00.{fn}", vendor=v, device=d, cls=c,
                               driver=drv, group=group, parent=port, subsys=(v, d)))
    dom = 1
    while len(devices) < n:  # more domains for the rest, plain endpoints
        for slot in range(32):
            for fn in range(8):
                if len(devices) >= n:
                    break
                group += 1
                devices.append(Pci(addr=f"{dom:04x}:01:{slot:02x}.{fn}", vendor=0x8086,
                                   device=0x1533, cls=0x020000, driver="igb", group=group))
        dom += 1
    return Host(name="big", cpu_vendor="intel", cpu_flags=("vmx",), devices=devices,
                iommu=("dmar0",), kvm_modules={"kvm_intel": {"nested": "Y"}})


def ours(root: Path) -> tuple[float, int]:
    pciids.load.cache_clear()  # the CLI parses pci.ids once per run; so does this
    started = time.perf_counter()
    fs = Sysfs(str(root))
    inv = Inventory(fs)
    inv.scan()
    body = encode(inv.report(host_caps(fs, None)))
    return time.perf_counter() - started, len(body)


def lspci(root: Path) -> tuple[float, int]:
    started = time.perf_counter()
    out = subprocess.run(["lspci", "-nnk", "-A", "linux-sysfs", "-O",
                          f"sysfs.path={root}/bus/pci"], capture_output=True, check=True)
    return time.perf_counter() - started, out.stdout.count(b"\n")


def byte_compile() -> dict[str, str]:
    """Compile what the CLI imports, as an installed package is (under PYTHONDONTWRITEBYTECODE
    every process would compile it from source), and the environment to run it in."""
    for package in ("cli", "shared", "services/hardware"):
        compileall.compile_dir(str(REPO / package), quiet=1)
    return {**{k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"},
            "PYTHONPATH": str(REPO)}


def cli(root: Path | None, env: dict[str, str] | None = None) -> float:
    """Our CLI as a process: asking the hardware agent (``root`` None), or scanning ``root``
    itself, pci.ids read afresh (there is no cache of it)."""
    tree = ["--sysfs-root", str(root)] if root is not None else []
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "cli.main", "hw", "report", "--json", *tree],
                          cwd=REPO, capture_output=True, check=True, env=env)
    took = time.perf_counter() - started
    if root is None and done.stdout.count(b'"address"') < 1000:
        raise SystemExit("hw report did not come from the agent on the big tree")
    return took


def uevent_update(root: Path, count: int = 500) -> float:
    inv = Inventory(Sysfs(str(root)))
    inv.scan()
    addrs = [d.address for d in inv.devices()][:count]
    times = []
    for addr in addrs:
        started = time.perf_counter()
        inv.update(addr)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def run(quick: bool = False, devices: int = 2000, repeat: int = 7) -> list[Result]:
    with tempfile.TemporaryDirectory() as tmp:
        root = build(tmp, big_host(devices)).root
        n = len(list((root / "bus/pci/devices").iterdir()))
        env = byte_compile()
        server = NatsServer(Path(tmp) / "nats", port=-1)
        server.start()
        agent = AgentProcess("hardware", server.url, Path(tmp) / "state", host="bench",
                             PHYLLOME_SYSFS_ROOT=str(root))
        try:
            asyncio.run(agent.start())
            via = {**env, "PHYLLOME_NATS_URL": server.url, "PHYLLOME_HOST": "bench"}
            cli(None, via)  # one call first, as the scanned runs have their tree in the cache
            a, b, c, d = [], [], [], []
            for _ in range(3 if quick else repeat):
                a.append(ours(root)[0])
                b.append(lspci(root)[0])
                c.append(cli(root, env))
                d.append(cli(None, via))
        finally:
            agent.kill()
            server.stop()
        t_ours, t_lspci, t_cli, t_agent = (statistics.median(x) for x in (a, b, c, d))
        t_update = uevent_update(root)
    ms = 1000
    return [
        Result("hw full scan + report", f"{n} devices, in process", t_ours * ms, t_lspci * ms,
               "lspci -nnk", "ms", "within 1.5x"),
        Result("hw report CLI", f"`phyllome hw report --json`, {n} devices, from the agent",
               t_agent * ms, t_lspci * ms, "lspci -nnk", "ms", ">= 0.8x",
               note="what a host running Phyllome answers: Python start-up, one request, "
                    "the agent's live inventory"),
        Result("hw report CLI", f"`phyllome hw report --json --sysfs-root DIR`, {n} devices, "
               "scanned", t_cli * ms, t_lspci * ms, "lspci -nnk", "ms", "-",
               note="no agent: includes Python start-up; pci.ids read afresh, no cache"),
        Result("hw uevent update", "one device", t_update * ms, 5.0, "target", "ms", "< 5 ms"),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    for r in run(devices=args.devices, repeat=args.repeat):
        print(r.row())


if __name__ == "__main__":
    main()
