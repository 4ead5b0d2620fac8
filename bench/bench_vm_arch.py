"""Time to userspace of the aarch64 phyllome-tiny guest: through the vm agent against a bare
``qemu-system-aarch64`` command line of the same boot, alternately, same run.

Both boot the arm64 build's RAW disk (shim, GRUB, signed kernel) on QEMU's ``virt``
machine under TCG, 1 vCPU, 512 MiB, with AAVMF's Secure Boot build and a fresh copy of its
Microsoft-keys variable store, a virtio disk and RNG, no display: ours is ``vm create`` +
``vm start`` on the real libvirtd (its domain XML, libvirt's firmware pick, the agent), the
clock running from the start request to the guest's ``PHYLLOME-TINY: ready`` line in its
serial log. The bare QEMU runs in a CPU cgroup beside libvirt's VMs (see ``_same_share``),
so both get the same share of a loaded host. The median counts; target: ours within 10 %
(ratio >= 0.91).

    .venv/bin/python -m bench.bench_vm_arch [--quick]
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import msgspec

from bench.common import Result
from services.vm import service
from shared.agent import Agent
from shared.config import load
from shared.messages import vm as vm_api
from shared.messages.vm import Disk, VmCreate, VmDelete, VmRef, VmSpec
from shared.natsserver import NatsServer
from tests.support.libvirt import ensure_libvirtd
from tests.support.tiny import ensure_tiny_image

HOST = "bench"
READY = b"PHYLLOME-TINY: ready"
AAVMF = Path("/usr/share/AAVMF")
DEADLINE_S = 600.0


async def _ready(log: Path, started: float) -> float:
    while time.perf_counter() - started < DEADLINE_S:
        with contextlib.suppress(OSError):
            if READY in log.read_bytes():
                return time.perf_counter() - started
        await asyncio.sleep(0.1)
    raise TimeoutError(f"no {READY.decode()} in {log} within {DEADLINE_S:g} s")


# libvirt runs each VM's QEMU in its own CPU cgroup under "machine" (weight 1024 for all of
# its threads together); a QEMU started by hand competes thread by thread with everything
# else. On a loaded host that alone made a hand-started boot 2-4x faster (229/161/75 s
# against 101/37/41 s in a first run here). The bare QEMU is put in a sibling cgroup of the
# same weight, so the two boots get the same share of the CPUs.
CGROUP_MACHINE = (Path("/sys/fs/cgroup/cpu/machine"), Path("/sys/fs/cgroup/machine"))


def _same_share(pid: int) -> Path | None:
    """Move ``pid`` into a cgroup beside libvirt's VMs (None: no such hierarchy here)."""
    for machine in CGROUP_MACHINE:
        if machine.is_dir():
            group = machine / "phyllome-bench-bare"
            group.mkdir(exist_ok=True)
            (group / "cgroup.procs").write_text(str(pid))
            return group
    return None


async def bare(disk: Path, work: Path) -> float:
    vars_copy, log = work / "AAVMF_VARS.fd", work / "bare.log"
    shutil.copyfile(AAVMF / "AAVMF_VARS.ms.fd", vars_copy)
    log.unlink(missing_ok=True)
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        "qemu-system-aarch64", "-machine", "virt,gic-version=3", "-accel", "tcg", "-cpu", "max",
        "-m", "512", "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none",
        "-serial", f"file:{log}",
        "-drive", f"if=pflash,format=raw,unit=0,file={AAVMF / 'AAVMF_CODE.ms.fd'},readonly=on",
        "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}",
        "-drive", f"file={disk},format=raw,if=none,id=d0,snapshot=on",
        "-device", "virtio-blk-pci,drive=d0,bootindex=0", "-device", "virtio-rng-pci",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL)
    group = _same_share(proc.pid)
    try:
        return await _ready(log, started)
    finally:
        proc.kill()
        await proc.wait()
        if group is not None:
            with contextlib.suppress(OSError):
                group.rmdir()


async def ours(agent: Agent, spec: VmSpec, consoles: Path) -> float:
    info = await agent.bus.call(HOST, vm_api.CREATE, VmCreate(spec=spec), timeout=120)
    log = consoles / f"{info.uuid}.log"
    started = time.perf_counter()
    await agent.bus.call(HOST, vm_api.START, VmRef(vm=info.uuid), timeout=120)
    try:
        return await _ready(log, started)
    finally:
        await agent.bus.call(HOST, vm_api.DELETE, VmDelete(vm=info.uuid, force=True),
                             timeout=120)


async def run(quick: bool) -> list[Result]:
    ensure_libvirtd()
    image = ensure_tiny_image(arch="aarch64")
    rounds = 1 if quick else 3
    shared = any(m.is_dir() for m in CGROUP_MACHINE)
    with tempfile.TemporaryDirectory(prefix="phyllome-bench-arch-", dir="/var/tmp") as tmp:
        root = Path(tmp)
        root.chmod(0o755)  # QEMU (libvirt-qemu) reads the disk
        disk = root / "tiny-aarch64.raw"
        shutil.copyfile(image.disk, disk)
        disk.chmod(0o644)
        server = NatsServer(root / "nats", port=-1)
        server.start()
        cfg = msgspec.structs.replace(
            load("vm", env={"PHYLLOME_HOST": HOST, "PHYLLOME_NATS_URL": server.url,
                            "PHYLLOME_STATE_DIR": str(root / "state"),
                            "PHYLLOME_VM_METRICS_PORT": "0"}),
            libvirt_uri="qemu:///system", accelerator="tcg",
            extra={"reconcile_s": 3600, "console_dir": str(root / "consoles")})
        agent = Agent("vm", cfg)
        await agent.start(service.setup, service.ENDPOINTS)
        mine, theirs = [], []
        try:
            for i in range(rounds):
                spec = VmSpec(name=f"phy-bench-arm-{i}", arch="aarch64", machine="virt",
                              vcpus=1, memory_mib=512, secure_boot=True, display="none",
                              video="none", usb=False, guest_agent=False, balloon=False,
                              disks=[Disk(path=str(disk), readonly=True)])
                mine.append(await ours(agent, spec, root / "consoles"))
                theirs.append(await bare(disk, root))
        finally:
            await agent.drain()
            server.stop()
    return [Result("vm boot aarch64 (TCG)", "start -> userspace, AAVMF Secure Boot, disk "
                   "(median)", statistics.median(mine), statistics.median(theirs),
                   "qemu-system-aarch64", "s", ">= 0.91x",
                   note=f"{rounds} round(s) each, alternately, bare QEMU in a cgroup beside "
                        f"libvirt's VMs ({'yes' if shared else 'none here'}); 1 vCPU, cpu max; "
                        f"ours {', '.join(f'{t:.0f}' for t in mine)} s, theirs "
                        f"{', '.join(f'{t:.0f}' for t in theirs)} s")]


if __name__ == "__main__":
    for result in asyncio.run(run("--quick" in sys.argv)):
        print(result.row())
