"""Cold migration between two hosts on one nats-server: real vm agents (libvirt test driver,
a host file each), real storage agents moving real volume files, real hardware agents.

The migration job runs in host a's vm agent, as the agent's ``migrate`` endpoint will run it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from services.vm.migration import PAUSE_ENV
from shared import subjects
from shared.agent import Agent
from shared.codec import decode
from shared.errors import Conflict, NotFound, PhyError
from shared.jobs import wait_job
from shared.messages import Empty, EndpointSpec
from shared.messages import storage as storage_api
from shared.messages import vm as vm_api
from shared.messages.jobs import JobAccepted, JobFinished, JobProgress, JobRef
from shared.messages.storage import CreateVolume, IncomingList, VolumeQuery
from shared.messages.vm import (
    CloudInit,
    Disk,
    MigrationLock,
    VmCreate,
    VmDelete,
    VmInfo,
    VmMigrate,
    VmRecord,
    VmRef,
    VmSpec,
    VmUpdate,
)
from shared.natsserver import NatsServer
from tests.support.agents import AgentProcess, agent_in_process
from tests.support.libvirt import TEST_HOST_XML, libvirtd_with_test_driver
from tests.support.wait import until

pytestmark = pytest.mark.integration

SIZE = 32 << 20


class Pair:
    """Hosts a and b: each a vm, a storage and a hardware agent."""

    def __init__(self, nats: NatsServer, root: Path) -> None:
        self.nats, self.root = nats, root
        self.agents: dict[tuple[str, str], Agent] = {}

    @property
    def bus(self) -> Any:
        return next(iter(self.agents.values())).bus

    def state(self, host: str) -> Path:
        return self.root / host

    async def call(self, host: str, spec: EndpointSpec[Any, Any], req: Any, **kw: Any) -> Any:
        return await self.bus.call(host, spec, req, **kw)

    async def volume(self, host: str, name: str) -> tuple[str, str]:
        """A volume on ``host`` with 8 MiB of random data in 32 MiB; (path, sha256)."""
        info = await self.call(host, storage_api.CREATE, CreateVolume(name=name,
                                                                         size_bytes=SIZE))
        data = os.urandom(8 << 20)
        with open(info.path, "r+b") as f:
            f.seek(4 << 20)
            f.write(data)
        with open(info.path, "rb") as f:
            return info.path, hashlib.file_digest(f, "sha256").hexdigest()

    async def vm(self, host: str, name: str, **spec: Any) -> VmInfo:
        await self.volume(host, f"{name}-disk0")
        return await self.call(host, vm_api.CREATE, VmCreate(spec=VmSpec(
            name=name, memory_mib=64, vcpus=1, firmware="bios", display="none",
            disks=[Disk(pool="default", volume=f"{name}-disk0", owned=True)], **spec)))

    async def start(self, req: VmMigrate) -> JobAccepted:
        """The migration as a job of host a's vm agent (its ``migrate`` endpoint)."""
        accepted: JobAccepted = await self.call("a", vm_api.MIGRATE, req)
        return accepted

    async def migrate(self, req: VmMigrate, timeout: float = 90) -> JobFinished:
        return await self.wait(await self.start(req), timeout)

    async def wait(self, accepted: JobAccepted, timeout: float) -> JobFinished:
        return await wait_job(self.bus, "a", "vm", accepted, timeout=timeout)

    async def record(self, uuid: str) -> VmRecord:
        entry = await (await self.bus.kv(subjects.KV_VMS)).get(uuid)
        return decode(entry.value, VmRecord)

    def paused(self, uuid: str) -> Path:
        """The marker a migration paused by ``PAUSE_ENV`` waits on (remove it to go on)."""
        return self.state("a") / "vm" / "migrations" / f"{uuid}.paused"

    async def start_everywhere(self, uuid: str) -> dict[str, str]:
        """``vm start`` on both hosts at once: host -> "started" or the refusal's kind."""
        async def one(host: str) -> str:
            try:
                await self.call(host, vm_api.START, VmRef(vm=uuid))
            except PhyError as e:
                return e.kind
            return "started"

        a, b = await asyncio.gather(one("a"), one("b"))
        return {"a": a, "b": b}

    async def running_on(self, uuid: str) -> list[str]:
        out = []
        for host in ("a", "b"):
            with contextlib.suppress(NotFound):
                if (await self.call(host, vm_api.INFO, VmRef(vm=uuid))).state == "running":
                    out.append(host)
        return out

    async def assert_whole(self, uuid: str, owner: str) -> None:
        """Exactly one owner (``owner``, not locked, the VM defined there); it runs on one
        host at most, the owner, also when both are asked to start it."""
        rec = await self.record(uuid)
        assert (rec.host, rec.migration) == (owner, None), rec
        await self.call(owner, vm_api.INFO, VmRef(vm=uuid))
        tried = await self.start_everywhere(uuid)
        running = await self.running_on(uuid)
        assert running == [owner], (tried, running)


async def _tick() -> None:
    await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def pair(nats: NatsServer, root: Path, *, skip: tuple[tuple[str, str], ...] = (),
               storage: dict[str, Any] | None = None) -> AsyncIterator[Pair]:
    p = Pair(nats, root)
    async with contextlib.AsyncExitStack() as stack:
        for host in ("a", "b"):
            state = p.state(host)
            state.mkdir(parents=True, exist_ok=True)
            (state / "host.xml").write_text(TEST_HOST_XML)
            for name, extra in (("hardware", {}), ("storage", {"extra": storage or {}}),
                                ("vm", {"libvirt_uri": f"test://{state / 'host.xml'}",
                                        "accelerator": "tcg",
                                        "extra": {"reconcile_s": 3600,
                                                  "disk_dir": str(state / "disks")}})):
                if (host, name) in skip:
                    continue
                p.agents[(host, name)] = await stack.enter_async_context(
                    agent_in_process(name, nats.url, state, host=host, **extra))
        for agent in p.agents.values():  # resources and pools into the heartbeats now
            await agent.beat()
        yield p


async def test_stopped_vm_moves_with_its_disk_and_identity(nats_server: NatsServer,
                                                           tmp_path: Path) -> None:
    async with pair(nats_server, tmp_path) as p:
        before = await p.vm("a", "m1")
        src_path, digest = await p.call("a", storage_api.INFO, VolumeQuery(
            name="m1-disk0", sha256=True)), None
        digest = src_path.sha256
        st = await p.migrate(VmMigrate(vm="m1", to="b"))
        assert st.state == "succeeded", st.message
        assert st.result["to"] == "b" and st.result["disks"] == ["default/m1-disk0"]
        after: VmInfo = await p.call("b", vm_api.INFO, VmRef(vm="m1"))
        assert after.uuid == before.uuid and after.state == "shutoff"
        assert after.spec.nics == before.spec.nics
        moved = await p.call("b", storage_api.INFO, VolumeQuery(name="m1-disk0", sha256=True))
        assert moved.sha256 == digest and moved.path.startswith(str(p.state("b")))
        assert after.spec.disks[0].path == moved.path
        with pytest.raises(NotFound):
            await p.call("a", vm_api.INFO, VmRef(vm="m1"))
        with pytest.raises(NotFound):  # the source's disk went with it
            await p.call("a", storage_api.INFO, VolumeQuery(name="m1-disk0"))
        rec = await p.record(before.uuid)
        assert rec.host == "b" and rec.spec.name == "m1"
        steps = await _job_messages(p, st.job_id)
        assert steps[0].startswith("preflight on b") and steps[-1] == "done"
        assert any(s.startswith("verifying the sha256") for s in steps)


async def test_the_cloud_init_seed_is_written_on_the_target_with_the_same_instance_id(
        nats_server: NatsServer, tmp_path: Path) -> None:
    async with pair(nats_server, tmp_path) as p:
        before = await p.vm("a", "ci", cloud_init=CloudInit(hostname="ci"))
        assert before.spec.cloud_init is not None and Path(before.spec.seed).is_file()
        st = await p.migrate(VmMigrate(vm="ci", to="b"))
        assert st.state == "succeeded", st.message
        after: VmInfo = await p.call("b", vm_api.INFO, VmRef(vm="ci"))
        assert after.spec.cloud_init == before.spec.cloud_init  # cloud-init: same machine
        assert after.spec.seed.startswith(str(p.state("b"))) and Path(after.spec.seed).is_file()
        assert (await p.record(before.uuid)).spec.seed == after.spec.seed
        assert not Path(before.spec.seed).exists()


async def test_each_step_of_a_migration_is_one_progress_event(nats_server: NatsServer,
                                                              tmp_path: Path) -> None:
    """Every step is published once (it was twice, with two event ids, so a follower saw
    each step twice); the transfer's own progress in between is throttled, not counted."""
    async with pair(nats_server, tmp_path) as p:
        await p.vm("a", "m3")
        st = await p.migrate(VmMigrate(vm="m3", to="b"))
        assert st.state == "succeeded", st.message
        steps = [m for m in await _job_messages(p, st.job_id)
                 if not m.startswith("sending") or m.endswith(" to b")]
        assert steps == ["preflight on b", "sending disk 1/1 (default/m3-disk0) to b",
                         "defining m3 on b", "verifying the sha256 of 1 disk(s) on b",
                         "removing m3 from a", "done"]


async def _job_messages(p: Pair, job_id: str) -> list[str]:
    """The message of every progress event of a migration job, in order."""
    out = []
    async for _s, _t, data in p.bus.events(subjects.event("a", "vm", "job", job_id)):
        if b'"job.progress.v1"' in data:
            out.append(msgspec.json.decode(data, type=JobProgress).message)
    return out


async def test_refusals_leave_everything_as_it_was(nats_server: NatsServer,
                                                  tmp_path: Path) -> None:
    async with pair(nats_server, tmp_path) as p:
        vm = await p.vm("a", "m2")
        await p.vm("b", "m2")  # a VM of the same name on the target
        st = await p.migrate(VmMigrate(vm="m2", to="b"))
        assert st.state == "failed" and st.error_kind == Conflict.kind
        assert "b has a VM m2 already" in st.message
        st = await p.migrate(VmMigrate(vm="m2", to="a"))
        assert st.state == "failed" and "is on a already" in st.message
        st = await p.migrate(VmMigrate(vm="m2", to="nowhere"))
        assert st.state == "failed" and "no host 'nowhere' in the cluster" in st.message
        await p.call("a", vm_api.START, VmRef(vm="m2"))
        st = await p.migrate(VmMigrate(vm="m2", to="b"))
        assert st.state == "failed" and "is running: cold migration needs it shut off" in (
            st.message)
        assert (await p.call("a", vm_api.INFO, VmRef(vm="m2"))).uuid == vm.uuid
        assert (await p.record(vm.uuid)).host == "a"


async def test_target_storage_killed_mid_transfer_vm_stays_whole(
        nats_server: NatsServer, tmp_path: Path) -> None:
    """The receiver dies and stays dead past the sender's patience: the job fails, the VM is
    whole on a; once the receiver is back, the same migration runs again and succeeds."""
    async with pair(nats_server, tmp_path, skip=(("b", "storage"),),
                    storage={"resume_timeout_s": 3.0, "chunk_timeout_s": 1.0}) as p:
        receiver = AgentProcess("storage", nats_server.url, p.state("b"), host="b")
        await receiver.start()
        try:
            vm = await p.vm("a", "m4")
            accepted = await p.start(VmMigrate(vm="m4", to="b", bwlimit_bytes_s=2 << 20))
            await _until_receiving(p, accepted.job_id)
            receiver.kill()
            st = await p.wait(accepted, 90)
            assert st.state == "failed", st
            assert "failed at step 1/5" in st.message and "the VM is whole on a" in st.message
            info = await p.call("a", vm_api.INFO, VmRef(vm="m4"))
            assert info.uuid == vm.uuid and info.spec.disks[0].volume == "m4-disk0"
            await p.call("a", storage_api.INFO, VolumeQuery(name="m4-disk0"))
            assert (await p.record(vm.uuid)).host == "a"
            with pytest.raises(NotFound):
                await p.call("b", vm_api.INFO, VmRef(vm="m4"))
            await receiver.start()  # back: the job can be retried
            st = await p.migrate(VmMigrate(vm="m4", to="b"))
            assert st.state == "succeeded", st.message
            assert (await p.call("b", vm_api.INFO, VmRef(vm="m4"))).uuid == vm.uuid
        finally:
            await receiver.stop()


async def test_cancelled_mid_transfer_rolls_back(nats_server: NatsServer,
                                                 tmp_path: Path) -> None:
    async with pair(nats_server, tmp_path) as p:
        vm = await p.vm("a", "m5")
        accepted = await p.start(VmMigrate(vm="m5", to="b", bwlimit_bytes_s=1 << 20))
        await _until_receiving(p, accepted.job_id)
        await p.call("a", vm_api.CANCEL, JobRef(job_id=accepted.job_id))
        st = await p.wait(accepted, 60)
        assert st.state == "cancelled", st
        assert (await p.call("a", vm_api.INFO, VmRef(vm="m5"))).uuid == vm.uuid
        assert (await p.record(vm.uuid)).host == "a"
        deadline = time.monotonic() + 30
        while (await p.call("b", storage_api.INCOMING, Empty())).transfers:
            assert time.monotonic() < deadline, "b still holds the partial transfer"
            await _tick()
        with pytest.raises(NotFound):
            await p.call("b", storage_api.INFO, VolumeQuery(name="m5-disk0"))


async def _until_receiving(p: Pair, job_id: str) -> None:
    deadline = time.monotonic() + 60
    while not await _receiving(p):
        st = await p.call("a", vm_api.JOB, JobRef(job_id=job_id))
        assert st.state == "running", st
        assert time.monotonic() < deadline, "the transfer did not start"
        await _tick()


async def _receiving(p: Pair) -> bool:
    try:
        inc: IncomingList = await p.call("b", storage_api.INCOMING, Empty(), timeout=2)
    except Exception:
        return False
    return any(t.committed_bytes > 0 for t in inc.transfers)


async def test_mid_migration_no_host_starts_changes_or_claims_the_vm(
        nats_server: NatsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Paused once the target has defined its copy: the source refuses start, update and
    delete (the migration holds the VM), the target refuses start (it does not own the VM)
    and its reconciliation leaves the record alone even when it finds its copy running (it
    used to rewrite the owner); the commit hands the VM over in one write."""
    monkeypatch.setenv(PAUSE_ENV, "defined")
    async with pair(nats_server, tmp_path) as p:
        vm = await p.vm("a", "m8")
        accepted = await p.start(VmMigrate(vm="m8", to="b"))
        await until("the migration to pause", p.paused(vm.uuid).exists)
        assert await p.start_everywhere(vm.uuid) == {"a": "conflict", "b": "conflict"}
        with pytest.raises(Conflict, match=f"VM m8 is being migrated from a to b \\(job "
                                           f"{accepted.job_id} of the vm agent of a\\)"):
            await p.call("a", vm_api.START, VmRef(vm="m8"))
        with pytest.raises(Conflict, match="VM m8 belongs to host a, not b .*--host a"):
            await p.call("b", vm_api.START, VmRef(vm="m8"))
        with pytest.raises(Conflict, match="delete it once the migration has ended"):
            await p.call("a", vm_api.DELETE, VmDelete(vm="m8"))
        with pytest.raises(Conflict, match="update it once the migration has ended"):
            await p.call("a", vm_api.UPDATE, VmUpdate(vm="m8", vcpus=2))
        target = p.agents[("b", "vm")].handlers
        await target.hv.start(vm.uuid)  # behind the agent's back, as `virsh start` would
        await target.states.reconcile()  # sees it running: not a reason to own it
        await target.hv.destroy(vm.uuid)
        rec = await p.record(vm.uuid)
        assert rec.host == "a" and rec.migration == MigrationLock(
            job_id=accepted.job_id, source="a", target="b", since=rec.migration.since)
        p.paused(vm.uuid).unlink()
        st = await p.wait(accepted, 60)
        assert st.state == "succeeded", st.message
        moved = await p.call("b", storage_api.INFO, VolumeQuery(name="m8-disk0"))
        assert (await p.record(vm.uuid)).spec.disks[0].path == moved.path
        await p.assert_whole(vm.uuid, "b")


async def test_every_disk_moves_and_the_source_keeps_only_what_another_vm_uses(
        nats_server: NatsServer, tmp_path: Path) -> None:
    """A disk the VM made, a volume it was given and a read-only volume another VM of the
    source also uses all move and are verified; the first two leave the source, the third
    stays there, and the reply says which."""
    async with pair(nats_server, tmp_path) as p:
        digests = {name: (await p.volume("a", name))[1]
                   for name in ("m9-disk0", "data", "media")}
        media = Disk(pool="default", volume="media", readonly=True, bus="sata")
        vm = await p.call("a", vm_api.CREATE, VmCreate(spec=VmSpec(
            name="m9", memory_mib=64, vcpus=1, firmware="bios", display="none",
            disks=[Disk(pool="default", volume="m9-disk0", owned=True),
                   Disk(pool="default", volume="data"), media])))
        await p.call("a", vm_api.CREATE, VmCreate(spec=VmSpec(
            name="other", memory_mib=64, vcpus=1, firmware="bios", display="none",
            disks=[media])))
        st = await p.migrate(VmMigrate(vm="m9", to="b"))
        assert st.state == "succeeded", st.message
        assert st.result["disks"] == ["default/m9-disk0", "default/data", "default/media"]
        assert st.result["removed_from_source"] == ["default/m9-disk0", "default/data"]
        assert st.result["kept_on_source"] == ["default/media (VM other uses it too)"]
        for name, digest in digests.items():
            there = await p.call("b", storage_api.INFO, VolumeQuery(name=name, sha256=True))
            assert there.sha256 == digest, name
        for name in ("m9-disk0", "data"):
            with pytest.raises(NotFound):
                await p.call("a", storage_api.INFO, VolumeQuery(name=name))
        assert (await p.call("a", storage_api.INFO, VolumeQuery(
            name="media", sha256=True))).sha256 == digests["media"]
        assert (await p.call("b", vm_api.INFO, VmRef(vm="m9"))).uuid == vm.uuid


@contextlib.asynccontextmanager
async def pair_of_vm_processes(nats: NatsServer, root: Path,
                               pause: str) -> AsyncIterator[tuple[Pair, dict[str, AgentProcess]]]:
    """Hosts a and b whose vm agents run as child processes (to be killed with SIGKILL),
    each on a libvirtd of its own that keeps its domains across the agent's restarts;
    their hardware and storage agents run in this process. a's migrations pause at
    ``pause``."""
    with libvirtd_with_test_driver() as uri_a, libvirtd_with_test_driver() as uri_b:
        async with pair(nats, root, skip=(("a", "vm"), ("b", "vm"))) as p:
            procs = {}
            for host, uri in (("a", uri_a), ("b", uri_b)):
                config = p.state(host) / "vm.toml"
                config.write_text(f'[vm]\nreconcile_s = 3600\n'
                                  f'disk_dir = "{p.state(host) / "disks"}"\n')
                env = {"PHYLLOME_LIBVIRT_URI": uri, "PHYLLOME_ACCELERATOR": "tcg",
                       "PHYLLOME_CONFIG": str(config)}
                if host == "a":
                    env[PAUSE_ENV] = pause
                procs[host] = AgentProcess("vm", nats.url, p.state(host), host=host, **env)
            try:
                for proc in procs.values():
                    await proc.start()
                yield p, procs
            finally:
                for proc in procs.values():
                    await proc.stop()


@pytest.mark.timeout(240)
@pytest.mark.parametrize("victim", ["source", "target"])
@pytest.mark.parametrize("step", ["sent", "defined", "committed"])
async def test_a_vm_agent_killed_mid_migration_leaves_one_owner(
        step: str, victim: str, nats_server: NatsServer, tmp_path: Path) -> None:
    """kill -9 of the source's or the target's vm agent at a step of a migration: both
    hosts are asked to start the VM at that point, and again once it has settled (the
    restarted source rolls back before the commit and finishes after it; the source carries
    on without the killed target): at most one host runs it, and exactly one owns it."""
    committed = step == "committed"
    owner = "b" if committed else "a"
    async with pair_of_vm_processes(nats_server, tmp_path, step) as (p, vm_agents):
        vm = await p.vm("a", "k1")
        accepted = await p.start(VmMigrate(vm="k1", to="b"))
        await until(f"the migration to pause at {step}", p.paused(vm.uuid).exists, timeout=60)
        on_b = {"sent": "not_found", "defined": "conflict", "committed": "started"}[step]
        assert await p.start_everywhere(vm.uuid) == {"a": "conflict", "b": on_b}
        assert await p.running_on(vm.uuid) == (["b"] if committed else [])
        assert (await p.record(vm.uuid)).host == owner

        killed = vm_agents["a" if victim == "source" else "b"]
        killed.kill()
        if victim == "source":
            killed.env.pop(PAUSE_ENV)
            await killed.start()
            journal = p.state("a") / "vm" / "migrations"
            await until("the restarted source to settle the migration",
                        lambda: not list(journal.glob("*.json")), timeout=90)
        else:
            p.paused(vm.uuid).unlink()  # the source carries on while the target is down
        outcome = await p.wait(accepted, 90)
        assert outcome.state == ("succeeded" if committed else "failed"), outcome
        if victim == "target":
            await killed.start()
        await p.assert_whole(vm.uuid, owner)
        if owner == "a" and not (victim == "target" and step == "defined"):
            with pytest.raises(NotFound):  # rolled back: nothing left on b
                await p.call("b", vm_api.INFO, VmRef(vm="k1"))
        with pytest.raises(NotFound):  # the disk is in one place only
            await p.call("b" if owner == "a" else "a", storage_api.INFO,
                         VolumeQuery(name="k1-disk0"))


def test_migrate_request_is_a_tagged_message() -> None:
    assert msgspec.json.decode(b'{"type":"vm.migrate.v1","vm":"x","to":"b"}',
                               type=VmMigrate) == VmMigrate(vm="x", to="b")


async def test_cli_migrate_list_and_auto_placement(nats_server: NatsServer,
                                                   tmp_path: Path) -> None:
    import asyncio
    import json
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]

    def phyllome(*args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PHYLLOME_NATS_URL": nats_server.url, "COLUMNS": "200"}
        return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=repo, env=env,
                              capture_output=True, text=True, timeout=120)

    async with pair(nats_server, tmp_path) as p:
        vm = await p.vm("a", "m6")
        moved = await asyncio.to_thread(phyllome, "vm", "migrate", "m6", "--to", "b",
                                        "--host", "a", "--json")
        assert moved.returncode == 0, moved.stdout + moved.stderr
        outcome = json.loads(moved.stdout)
        assert outcome["state"] == "succeeded" and outcome["result"]["to"] == "b"
        listed = await asyncio.to_thread(phyllome, "vm", "list", "--all", "--json")
        assert listed.returncode == 0, listed.stderr
        assert [(r["spec"]["uuid"], r["host"]) for r in json.loads(listed.stdout)["vms"]] == [
            (vm.uuid, "b")]
        placed = await asyncio.to_thread(phyllome, "vm", "create", "m7", "--host", "auto",
                                         "--memory", "64M", "--firmware", "bios",
                                         "--display", "none", "--json")
        assert placed.returncode == 0, placed.stdout + placed.stderr
        assert "placed on " in placed.stderr and "memory left after this VM" in placed.stderr
        assert json.loads(placed.stdout)["host"] in ("a", "b")
        again = await asyncio.to_thread(phyllome, "vm", "migrate", "m6", "--to", "b",
                                        "--host", "b")
        assert again.returncode == 1 and "is on b already" in again.stderr
