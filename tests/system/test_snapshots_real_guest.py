"""Snapshots and backups of a real guest: phyllome-tiny under UEFI Secure Boot with a TPM,
booted by the vm agent through the real libvirtd and QEMU (TCG), its disk a storage volume.

The guest counts its boots on a disk that starts with ``PHYLLOME-COUNTER <n>`` and prints
the TPM's resetCount (one more each boot, kept in the TPM state); both markers show which
disk and which TPM state a boot found. One guest serves the whole story, since each boot
takes tens of seconds under TCG. Its name does not start with ``phy-``: other system tests
remove such leftovers from the shared libvirtd.
"""

from __future__ import annotations

import contextlib
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from shared import contracts
from shared.agent import Agent
from shared.jobs import wait_job
from shared.messages import storage as storage_api
from shared.messages.storage import CreateVolume
from shared.messages.vm import (
    Disk,
    VmBackup,
    VmCreate,
    VmDelete,
    VmRef,
    VmRestore,
    VmSnapshotCreate,
    VmSnapshotRevert,
    VmSpec,
)
from shared.natsserver import NatsServer
from tests.support.agents import agent_in_process
from tests.support.libvirt import wait_for_marker
from tests.support.tiny import TinyImage

pytestmark = [pytest.mark.system, pytest.mark.timeout(600)]

HOST = "h1"
BOOT_S = 120.0


class Guest:
    def __init__(self, vm: Agent, files: Path) -> None:
        self.vm, self.files = vm, files

    async def call(self, verb: str, req: Any, timeout: float = 60.0) -> Any:
        return await self.vm.bus.call(HOST, contracts.spec("vm", verb), req, timeout=timeout)

    async def boot(self, vm: str) -> dict[str, str]:
        """Start ``vm`` and return the markers of this boot."""
        log = self.files / "consoles" / f"{vm}.log"
        if log.exists():
            log.write_text("")
        await self.call("start", VmRef(vm=vm))
        seen = await wait_for_marker(log, "ready", BOOT_S)
        await self.call("destroy", VmRef(vm=vm))
        return seen


@contextlib.asynccontextmanager
async def guest(nats: NatsServer, state: Path, files: Path,
                tiny: TinyImage) -> AsyncIterator[Guest]:
    for src in (tiny.kernel, tiny.initrd):
        shutil.copy(src, files / src.name)
        (files / src.name).chmod(0o644)
    async with agent_in_process("storage", nats.url, state / "storage", host=HOST,
                                extra={"pools": {"default": str(files / "pool")}}), \
            agent_in_process("vm", nats.url, state / "vm", host=HOST,
                             libvirt_uri="qemu:///system", accelerator="tcg",
                             extra={"reconcile_s": 3600, "console_dir": str(files / "consoles"),
                                    "tiny_dir": str(files)}) as vm:
        g = Guest(vm, files)
        try:
            yield g
        finally:
            for dom in await vm.handlers.hv.domains():
                if dom.spec is not None and dom.spec.name.startswith("phs-snap-"):
                    with contextlib.suppress(Exception):
                        await g.call("delete", VmDelete(vm=dom.uuid, force=True,
                                                        delete_disks=True))


async def test_snapshot_revert_and_backup_restore_bring_back_disk_nvram_and_tpm(
        nats_server: NatsServer, tmp_path: Path, guest_dir: Path, libvirtd: str,
        tiny_image: TinyImage) -> None:
    async with guest(nats_server, tmp_path, guest_dir, tiny_image) as g:
        name = f"phs-snap-{uuid.uuid4().hex[:6]}"
        vol = await g.vm.bus.call(HOST, storage_api.CREATE, CreateVolume(
            name=f"{name}-disk0", size_bytes=16 << 20))
        with open(vol.path, "r+b") as f:
            f.write(b"PHYLLOME-COUNTER 0\n")
        info = await g.call("create", VmCreate(spec=VmSpec(
            name=name, memory_mib=256, vcpus=1, display="none", secure_boot=True,
            tpm="emulated-2.0", kernel=str(guest_dir / "vmlinuz"),
            initrd=str(guest_dir / "initrd.gz"), cmdline="console=ttyS0 phyllome.stay=1",
            disks=[Disk(volume=f"{name}-disk0", owned=True)])))
        vm = info.uuid

        first = await g.boot(vm)
        assert (first["secureboot"], first["disk_counter"]) == ("enabled", "0")
        resets = int(first["tpm_resets"])

        # The running guest is snapshotted (paused for the copies) and backed up.
        log = guest_dir / "consoles" / f"{vm}.log"
        log.write_text("")
        await g.call("start", VmRef(vm=vm))
        running = await wait_for_marker(log, "ready", BOOT_S)
        assert (running["disk_counter"], running["tpm_resets"]) == ("1", str(resets + 1))
        snap = await g.call("snapshot_create", VmSnapshotCreate(vm=vm, name="s1"))
        assert snap.state == "running" and snap.nvram and snap.tpm and snap.paused_s > 0
        backups = guest_dir / "backups"
        backups.mkdir()
        accepted = await g.call("backup", VmBackup(vm=vm, to=str(backups)))
        done = await wait_job(g.vm.bus, HOST, "vm", accepted.job_id, timeout=120)
        assert done.state == "succeeded", done.message
        assert (await g.call("info", VmRef(vm=vm))).state == "running"
        await g.call("destroy", VmRef(vm=vm))

        # It boots on: the disk and the TPM state move forward.
        later = await g.boot(vm)
        assert (later["disk_counter"], later["tpm_resets"]) == ("2", str(resets + 2))

        # Back to the snapshot: the disk and TPM state the snapshot saw.
        await g.call("snapshot_revert", VmSnapshotRevert(vm=vm, name="s1"))
        again = await g.boot(vm)
        assert (again["disk_counter"], again["tpm_resets"]) == ("2", str(resets + 2))
        assert again["secureboot"] == "enabled"  # the NVRAM's Secure Boot keys

        # The backup, restored as a copy, boots with the same disk, NVRAM and TPM state.
        accepted = await g.call("restore", VmRestore(archive=str(done.result["archive"]),
                                                     name=f"{name}-copy"))
        restored = await wait_job(g.vm.bus, HOST, "vm", accepted.job_id, timeout=120)
        assert restored.state == "succeeded", restored.message
        copy = await g.boot(str(restored.result["uuid"]))
        assert (copy["disk_counter"], copy["tpm_resets"], copy["secureboot"]) == (
            "2", str(resets + 2), "enabled")
