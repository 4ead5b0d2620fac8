"""VM start through the agent vs ``virsh start``, and 50 VMs created and started.

1. ``phyllome vm start`` -> the ``started`` event on the bus, against ``virsh start`` of the
   same domain on the real libvirtd (qemu:///system, TCG), alternately, same run; the
   median counts. Target: the agent adds at most 10 % (ratio >= 0.91).
2. Create + start of 50 VMs on libvirt's test driver through the agent, against one
   ``virsh`` process running the same 100 define/start commands on its own test host.

    .venv/bin/python -m bench.bench_vm_start [--quick]

Prints markdown table rows: | bench | measure | ours | theirs | ratio | target | note |.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec

from bench.common import Result
from services.vm import domain_xml, service
from shared import subjects
from shared.agent import Agent
from shared.codec import decode
from shared.config import load
from shared.messages import vm as vm_api
from shared.messages.vm import VmCreate, VmRef, VmSpec, VmStateChanged
from shared.natsserver import NatsServer

HOST = "bench"
TEST_HOST_XML = """<node><cpu><nodes>1</nodes><sockets>1</sockets><cores>2</cores>
<threads>1</threads><active>2</active><mhz>2000</mhz><model>x86_64</model></cpu>
<memory>134217728</memory></node>
"""


async def _agent(url: str, state: Path, uri: str) -> Agent:
    cfg = msgspec.structs.replace(
        load("vm", env={"PHYLLOME_HOST": HOST, "PHYLLOME_NATS_URL": url,
                        "PHYLLOME_STATE_DIR": str(state), "PHYLLOME_VM_METRICS_PORT": "0"}),
        libvirt_uri=uri, accelerator="tcg",
        extra={"reconcile_s": 3600, "console_dir": str(state / "consoles")})
    agent = Agent("vm", cfg)
    await agent.start(service.setup, service.ENDPOINTS)
    return agent


def _virsh(uri: str, *cmd: str) -> None:
    subprocess.run(["virsh", "-q", "-c", uri, *cmd], check=True, capture_output=True)


async def start_latency(url: str, state: Path, rounds: int) -> Result:
    uri = "qemu:///system"
    agent = await _agent(url, state, uri)
    started: asyncio.Queue[float] = asyncio.Queue()

    async def got(msg: object) -> None:
        ev = decode(msg.data, VmStateChanged)  # type: ignore[attr-defined]
        if ev.event == "started":
            started.put_nowait(time.perf_counter())

    sub = await agent.bus.nc.subscribe(subjects.event(HOST, "vm", "state") + ".*", cb=got)
    name = f"phy-bench-{int(time.time())}"
    info = await agent.bus.call(HOST, vm_api.CREATE, VmCreate(spec=VmSpec(
        name=name, firmware="bios", memory_mib=64, vcpus=1, display="none", usb=False,
        guest_agent=False)))
    ours, theirs = [], []
    try:
        for _ in range(rounds):
            t = time.perf_counter()
            await agent.bus.call(HOST, vm_api.START, VmRef(vm=name))
            ours.append(await asyncio.wait_for(started.get(), 30) - t)
            await agent.bus.call(HOST, vm_api.DESTROY, VmRef(vm=name))
            t = time.perf_counter()
            await asyncio.to_thread(_virsh, uri, "start", name)
            theirs.append(time.perf_counter() - t)
            await asyncio.wait_for(started.get(), 30)
            await asyncio.to_thread(_virsh, uri, "destroy", name)
    finally:
        await sub.unsubscribe()
        await asyncio.to_thread(_virsh, uri, "undefine", "--nvram", info.uuid)
        await agent.drain()
    return Result("vm start", "start -> running (median)", statistics.median(ours),
                  statistics.median(theirs), "virsh start", "s", ">= 0.91x",
                  note=f"{rounds} rounds, same domain, TCG")


async def fifty(url: str, state: Path, count: int) -> Result:
    state.mkdir(parents=True, exist_ok=True)
    host_file = state / "test-host.xml"
    host_file.write_text(TEST_HOST_XML)
    uri = f"test://{host_file}"
    agent = await _agent(url, state / "agent", uri)
    specs = [VmSpec(name=f"vm{i:03d}", uuid=f"00000000-0000-4000-8000-{i:012d}",
                    memory_mib=64, vcpus=1) for i in range(count)]
    t = time.perf_counter()
    for spec in specs:
        await agent.bus.call(HOST, vm_api.CREATE, VmCreate(spec=spec))
        await agent.bus.call(HOST, vm_api.START, VmRef(vm=spec.name))
    ours = time.perf_counter() - t
    await agent.drain()
    commands = []
    for spec in specs:
        path = state / f"{spec.name}.xml"
        path.write_text(domain_xml.build(spec, accelerator="tcg",
                                         serial_log=str(state / f"{spec.uuid}.log")))
        commands += [f"define {path}", f"start {spec.name}"]
    t = time.perf_counter()
    await asyncio.to_thread(_virsh, uri, "; ".join(commands))
    theirs = time.perf_counter() - t
    return Result("vm create+start", f"{count} VMs, test driver", ours, theirs,
                  "one virsh process", "s", "-",
                  note="ours: 2 bus requests, KV record, events and XML per VM")


async def run(quick: bool) -> list[Result]:
    with tempfile.TemporaryDirectory(prefix="phyllome-bench-vm-", dir="/var/tmp") as tmp:
        root = Path(tmp)
        server = NatsServer(root / "nats", port=-1)
        server.start()
        try:
            return [await start_latency(server.url, root / "start", 3 if quick else 10),
                    await fifty(server.url, root / "fifty", 50)]
        finally:
            server.stop()


if __name__ == "__main__":
    for result in asyncio.run(run("--quick" in sys.argv)):
        print(result.row())
