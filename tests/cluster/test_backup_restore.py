"""Backups across hosts through the CLI, in process: a running VM backed up on host a (as a
user would), its snapshots listed, a bad schedule refused, and b refusing to restore it as
itself while it lives on a; and a VM that is being migrated is not snapshotted. Two hosts on
one nats-server, real vm and storage agents (libvirt's test driver, a host file and a
libvirt folder each). The whole journey with a real guest (restored on b, booted there with
its NVRAM and TPM, a damaged archive refused) is test_backup_restore_cluster.py's, on the
three-host cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from shared.agent import Agent
from shared.errors import Conflict
from shared.messages import storage as storage_api
from shared.messages import vm as vm_api
from shared.messages.jobs import JobRef, JobStatus
from shared.messages.storage import CreateVolume
from shared.messages.vm import (
    Disk,
    Nic,
    VmCreate,
    VmGuestState,
    VmInfo,
    VmListRequest,
    VmMigrate,
    VmRef,
    VmSnapshotCreate,
    VmSpec,
)
from shared.natsserver import NatsServer
from tests.cluster.test_migration import pair
from tests.support.agents import REPO, agent_in_process
from tests.support.libvirt import TEST_HOST_XML
from tests.support.tarballs import tpm_state
from tests.support.wait import until

pytestmark = pytest.mark.integration

MiB = 1 << 20


@contextlib.asynccontextmanager
async def two_hosts(nats: NatsServer, root: Path) -> AsyncIterator[dict[str, Agent]]:
    """The vm agent of hosts a and b, each beside a storage agent."""
    vms: dict[str, Agent] = {}
    async with contextlib.AsyncExitStack() as stack:
        for h in ("a", "b"):
            state = root / h
            state.mkdir(parents=True)
            (state / "host.xml").write_text(TEST_HOST_XML)
            await stack.enter_async_context(agent_in_process("storage", nats.url, state, host=h))
            vms[h] = await stack.enter_async_context(agent_in_process(
                "vm", nats.url, state, host=h, libvirt_uri=f"test://{state / 'host.xml'}",
                accelerator="tcg", extra={"reconcile_s": 3600,
                                          "libvirt_dir": str(state / "libvirt")}))
        yield vms


def phyllome(nats: NatsServer, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PHYLLOME_NATS_URL": nats.url, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "cli.main", "vm", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


async def test_a_running_vm_backed_up_on_a_is_not_restored_as_itself_on_b(
        nats_server: NatsServer, tmp_path: Path) -> None:
    async with two_hosts(nats_server, tmp_path) as vms:
        bus = vms["a"].bus
        await bus.call("a", storage_api.CREATE, CreateVolume(name="web-disk0",
                                                             size_bytes=16 * MiB))
        web: VmInfo = await bus.call("a", vm_api.CREATE, VmCreate(spec=VmSpec(
            name="web", memory_mib=64, secure_boot=True, tpm="emulated-2.0", nics=[Nic()],
            disks=[Disk(volume="web-disk0", owned=True)])))
        await bus.call("a", vm_api.IMPORT_STATE, VmGuestState(
            uuid=web.uuid, nvram=b"uefi vars" * 100, tpm=tpm_state({"tpm2/permall": b"keys"})))
        await bus.call("a", vm_api.START, VmRef(vm="web"))
        backups = tmp_path / "backups"
        backups.mkdir()

        made = await asyncio.to_thread(phyllome, nats_server, "backup", "web", "--to",
                                       str(backups), "--host", "a", "--json")
        assert made.returncode == 0, made.stdout + made.stderr
        archive = json.loads(made.stdout)["result"]["archive"]
        assert Path(archive).parent == backups
        assert (await bus.call("a", vm_api.INFO, VmRef(vm="web"))).state == "running"
        snap = await asyncio.to_thread(phyllome, nats_server, "snapshot", "create", "web", "s1",
                                       "--host", "a")
        assert snap.returncode == 0 and "snapshot s1 of VM web: copy (not instant" in snap.stdout
        listed = await asyncio.to_thread(phyllome, nats_server, "snapshot", "list", "web",
                                         "--host", "a", "--json")
        assert [s["name"] for s in json.loads(listed.stdout)["snapshots"]] == ["s1"]
        bad = await asyncio.to_thread(phyllome, nats_server, "backup", "web", "--every", "soon")
        assert bad.returncode == 2 and "not a period" in bad.stderr

        # While web lives on a, b restores it only as a copy.
        same = await asyncio.to_thread(phyllome, nats_server, "restore", archive, "--host", "b")
        assert same.returncode == 1 and "exists on host a; restore with --name NEW" in (
            same.stderr)
        assert (await bus.call("b", vm_api.LIST, VmListRequest(all_hosts=False))).vms == []


async def test_a_vm_being_migrated_is_not_snapshotted(nats_server: NatsServer,
                                                      tmp_path: Path) -> None:
    async with pair(nats_server, tmp_path) as p:
        vm = await p.vm("a", "m1")
        accepted = await p.start(VmMigrate(vm="m1", to="b", bwlimit_bytes_s=1 << 20))

        async def sending() -> bool:
            st: JobStatus = await p.call("a", vm_api.JOB, JobRef(job_id=accepted.job_id))
            assert st.state == "running", st
            return st.message.startswith("sending")

        await until("the migration to send the disk", sending)
        with pytest.raises(Conflict, match="VM m1 is being migrated"):
            await p.call("a", vm_api.SNAPSHOT_CREATE, VmSnapshotCreate(vm="m1", name="s"))
        await p.call("a", vm_api.CANCEL, JobRef(job_id=accepted.job_id))
        deadline = time.monotonic() + 60
        while (await p.call("a", vm_api.JOB, JobRef(job_id=accepted.job_id))).state == "running":
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        snap: Any = await p.call("a", vm_api.SNAPSHOT_CREATE, VmSnapshotCreate(vm="m1",
                                                                                name="s"))
        assert snap.uuid == vm.uuid  # the migration is over: it may be snapshotted again
