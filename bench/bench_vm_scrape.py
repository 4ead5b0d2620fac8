"""Scrape of the vm agent's /metrics with 200 VMs: one bulk libvirt call (ours) against
prometheus-libvirt-exporter-style collection (one libvirt call per domain per metric:
info, block stats per disk, interface stats per NIC, memory stats), and against 1 VM.

Both go through the real libvirtd (libvirt's test driver hosted by the daemon,
``test+unix:///<host file>``), so every libvirt call is a real RPC. Ours is the whole HTTP
scrape of the running agent (collection and exposition); theirs is the libvirt calls alone.
Target: under 100 ms at 200 VMs. The test driver fills fewer bulk-statistics fields than
QEMU domains do, so the absolute numbers flatter both sides; the count of RPCs (1 against
4 per VM) is what carries over.

    python -m bench.bench_vm_scrape [--quick]
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import libvirt
import msgspec

from bench.common import Result, percentile
from services.vm import service
from shared.agent import Agent
from shared.config import load
from shared.natsserver import NatsServer

TARGET_S = 0.100
NODE = """<node>
  <cpu><nodes>1</nodes><sockets>1</sockets><cores>2</cores><threads>1</threads>
    <active>2</active><mhz>2000</mhz><model>x86_64</model></cpu>
  <memory>{memory}</memory>{domains}
</node>
"""
DOMAIN = """
  <domain type='test'>
    <name>bench-{i:03d}</name>
    <memory>262144</memory><currentMemory>262144</currentMemory><vcpu>1</vcpu>
    <os><type arch='x86_64'>hvm</type></os>
    <devices>
      <disk type='file' device='disk'><source file='/var/tmp/bench-{i}.raw'/>
        <target dev='vda' bus='virtio'/></disk>
      <interface type='network'><source network='default'/></interface>
    </devices>
  </domain>"""


def host_file(folder: Path, vms: int) -> str:
    """A test-driver host with ``vms`` running domains; libvirtd (root) reads it."""
    path = folder / f"host-{vms}.xml"
    path.write_text(NODE.format(memory=(vms + 1) * 262144,
                                domains="".join(DOMAIN.format(i=i) for i in range(vms))))
    path.chmod(0o644)
    return f"test+unix://{path}"


def exporter_style(uri: str) -> float:
    """One scrape as prometheus-libvirt-exporter collects: calls per domain per metric."""
    conn = libvirt.openReadOnly(uri)
    try:
        started = time.perf_counter()
        for dom in conn.listAllDomains():
            dom.info()  # state, max/current memory, vCPUs, CPU time
            dom.memoryStats()
            dom.blockStats("vda")
            for iface in ("testnet0",):
                dom.interfaceStats(iface)
        return time.perf_counter() - started
    finally:
        conn.close()


async def scrape_times(uri: str, vms: int, nats_url: str, state: Path,
                       count: int) -> list[float]:
    """Start the real vm agent on ``uri``; time ``count`` HTTP scrapes of its /metrics."""
    cfg = msgspec.structs.replace(
        load("vm", env={"PHYLLOME_HOST": "bench", "PHYLLOME_NATS_URL": nats_url,
                        "PHYLLOME_STATE_DIR": str(state), "PHYLLOME_VM_METRICS_PORT": "0"}),
        libvirt_uri=uri, accelerator="tcg", extra={"reconcile_s": 3600})
    agent = Agent("vm", cfg)
    await agent.start(service.setup, service.ENDPOINTS)
    try:
        async with httpx.AsyncClient() as client:
            body = (await client.get(agent.metrics_url)).text
            seen = body.count("phyllome_vm_cpu_seconds_total{")
            assert seen == vms, f"the agent exports {seen} VMs, not {vms}"
            times = []
            for _ in range(count):
                t = time.perf_counter()
                reply = await client.get(agent.metrics_url)
                reply.raise_for_status()
                times.append(time.perf_counter() - t)
            return times
    finally:
        await agent.drain()


def libvirtd_answers() -> bool:
    if shutil.which("virsh") is None:
        return False
    done = subprocess.run(["virsh", "-c", "qemu:///system", "uri"], capture_output=True)
    return done.returncode == 0


async def run(quick: bool) -> list[Result]:
    if not libvirtd_answers():
        raise RuntimeError("libvirtd is not running: `deploy/setup.sh libvirt` starts it")
    count = 10 if quick else 50
    folder = Path(tempfile.mkdtemp(prefix="phyllome-bench-scrape-", dir="/var/tmp"))
    folder.chmod(0o755)
    nats = NatsServer(folder / "nats", port=-1, name="bench")
    nats.start()
    try:
        many, one = host_file(folder, 200), host_file(folder, 1)
        ours = await scrape_times(many, 200, nats.url, folder / "state-200", count)
        single = await scrape_times(one, 1, nats.url, folder / "state-1", count)
        theirs = [exporter_style(many) for _ in range(count)]
    finally:
        nats.stop()
        shutil.rmtree(folder, ignore_errors=True)
    p50, theirs50, single50 = (percentile(v, 50) * 1000 for v in (ours, theirs, single))
    target = "< 100 ms at 200 VMs"
    return [
        Result("vm scrape", "/metrics, 200 VMs, p50", p50, theirs50,
               "per-domain libvirt calls, exporter style", "ms", target,
               note=f"p95 {percentile(ours, 95) * 1000:.1f} ms; "
                    f"{'meets' if percentile(ours, 95) < TARGET_S else 'MISSES'} target"),
        Result("vm scrape", "/metrics, 200 VMs vs 1 VM, p50", p50, single50,
               "the same agent with 1 VM", "ms", target,
               note="cost of 199 more VMs in one scrape"),
    ]


if __name__ == "__main__":
    for result in asyncio.run(run("--quick" in sys.argv)):
        print(result.row())
