"""Cold migration of a stopped VM (one 1 GiB disk, 256 MiB of data) between two hosts on one
machine: the vm agent's ``migrate`` job (``services/vm/migration.py``: preflight, storage
stream, define, sha256 on both sides, source cleanup) vs what an operator does by hand:
``rsync --sparse`` of the disk and ``sha256sum`` of both copies — same file, same run.

    python -m bench.bench_cluster_migrate [--quick]
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import Result
from shared.agent import Agent
from shared.config import load
from shared.jobs import wait_job
from shared.messages import storage as storage_api
from shared.messages import vm as vm_api
from shared.messages.storage import CreateVolume
from shared.messages.vm import Disk, VmCreate, VmMigrate, VmSpec
from shared.natsserver import NatsServer

MiB = 1 << 20
HOST_XML = ("<node><cpu><nodes>1</nodes><sockets>1</sockets><cores>2</cores><threads>1</threads>"
            "<active>2</active><mhz>2000</mhz><model>x86_64</model></cpu>"
            "<memory>8388608</memory></node>")


async def start(stack: contextlib.AsyncExitStack, name: str, url: str, state: Path,
                host: str, **values: Any) -> Agent:
    import importlib

    import msgspec

    service = importlib.import_module(f"services.{name}.service")
    env = {"PHYLLOME_HOST": host, "PHYLLOME_NATS_URL": url, "PHYLLOME_STATE_DIR": str(state),
           f"PHYLLOME_{name.upper()}_METRICS_PORT": "0"}
    agent = Agent(name, msgspec.structs.replace(load(name, env=env), **values))
    await agent.start(service.setup, service.ENDPOINTS)
    stack.push_async_callback(agent.drain)
    return agent


def fill(path: str, data: int, extent: int = 8 * MiB) -> None:
    """``data`` bytes of random extents spread over the volume (holes between them)."""
    size = os.path.getsize(path)
    step = size // (data // extent)
    with open(path, "r+b") as f:
        for offset in range(0, data, extent):
            f.seek(offset // extent * step)
            f.write(os.urandom(extent))


async def ours(root: Path, url: str, virtual: int, data: int) -> float:
    async with contextlib.AsyncExitStack() as stack:
        agents: dict[tuple[str, str], Agent] = {}
        for host in ("a", "b"):
            state = root / host
            state.mkdir(parents=True)
            (state / "host.xml").write_text(HOST_XML)
            agents[(host, "hardware")] = await start(stack, "hardware", url, state, host)
            agents[(host, "storage")] = await start(stack, "storage", url, state, host)
            agents[(host, "vm")] = await start(
                stack, "vm", url, state, host, libvirt_uri=f"test://{state / 'host.xml'}",
                accelerator="tcg", extra={"reconcile_s": 3600})
        for agent in agents.values():  # resources and pools into the heartbeats now
            await agent.beat()
        vm = agents[("a", "vm")]
        vol = await vm.bus.call("a", storage_api.CREATE, CreateVolume(name="m-disk0",
                                                                        size_bytes=virtual))
        fill(vol.path, data)
        await vm.bus.call("a", vm_api.CREATE, VmCreate(spec=VmSpec(
            name="m", memory_mib=64, vcpus=1, firmware="bios", display="none",
            disks=[Disk(pool="default", volume="m-disk0", owned=True)])))

        t = time.perf_counter()
        accepted = await vm.bus.call("a", vm_api.MIGRATE, VmMigrate(vm="m", to="b"))
        st = await wait_job(vm.bus, "a", "vm", accepted, timeout=600)
        elapsed = time.perf_counter() - t
        assert st.state == "succeeded", st.message
        return elapsed


def theirs(root: Path, virtual: int, data: int) -> float:
    src, dst = root / "by-hand-a" / "disk.raw", root / "by-hand-b" / "disk.raw"
    src.parent.mkdir()
    dst.parent.mkdir()
    with open(src, "wb") as f:
        f.truncate(virtual)
    fill(str(src), data)
    t = time.perf_counter()
    subprocess.run(["rsync", "--sparse", str(src), str(dst)], check=True)
    subprocess.run(["sha256sum", str(src), str(dst)], check=True, capture_output=True)
    return time.perf_counter() - t


async def run(quick: bool = False) -> list[Result]:
    virtual, data = (256 * MiB, 64 * MiB) if quick else (1024 * MiB, 256 * MiB)
    if shutil.which("rsync") is None:
        return []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        server = NatsServer(root / "nats", port=-1)
        server.start()
        try:
            mine = await ours(root / "ours", server.url, virtual, data)
        finally:
            server.stop()
        by_hand = theirs(root, virtual, data)
    return [Result("cold migration (stopped VM)",
                   f"{virtual // MiB} MiB disk, {data // MiB} MiB data", mine, by_hand,
                   "rsync --sparse + sha256sum", "s", ">= 0.5x",
                   note="ours also: preflight, define on the target, source cleanup")]


if __name__ == "__main__":
    for r in asyncio.run(run("--quick" in sys.argv)):
        print(r.row())
