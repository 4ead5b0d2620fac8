"""The storage agent on a real nats-server: endpoints, jobs, events, VMs holding volumes."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import msgspec
import pytest

from shared import contracts
from shared.bus import Bus
from shared.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    InsufficientResources,
    InvalidName,
    NotFound,
    Unavailable,
)
from shared.jobs import wait_job
from shared.messages import Empty
from shared.messages import storage as storage_api
from shared.messages.jobs import JobFinished, JobRef
from shared.messages.storage import (
    CloneVolume,
    CreateVolume,
    ImportVolume,
    ListVolumes,
    ResizeVolume,
    SendVolume,
    TransferOffer,
    VolumeQuery,
    VolumeRef,
)
from tests.support.agents import REPO, agent_in_process
from tests.support.loopfs import make_sparse, same_sparse_content, scatter
from tests.support.require import require

pytestmark = pytest.mark.integration


async def finished(bus: Bus, host: str, job_id: str, timeout: float = 60) -> JobFinished:
    return await wait_job(bus, host, "storage", job_id, timeout=timeout)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


async def test_create_clone_info_delete(nats_server, tmp_path: Path) -> None:
    async with agent_in_process("storage", nats_server.url, tmp_path / "h1", "h1") as a:
        bus = a.bus
        pools = await bus.call("h1", storage_api.POOLS, Empty())
        assert [p.name for p in pools.pools] == ["default"]
        assert pools.pools[0].path == str(tmp_path / "h1" / "pools" / "default")
        info = await bus.call("h1", storage_api.CREATE,
                              CreateVolume(name="disk0", size_bytes=1 << 30))
        assert (info.virtual_bytes, info.allocated_bytes) == (1 << 30, 0)
        make_sparse(Path(info.path), 1 << 30, scatter(1 << 30, 8, 1 << 20))
        acc = await bus.call("h1", storage_api.CLONE,
                             CloneVolume(name="disk0", dst_name="disk1"))
        st = await finished(bus, "h1", acc.job_id)
        assert st.state == "succeeded", st.message
        assert st.result["method"] in ("reflink", "copy")
        src = await bus.call("h1", storage_api.INFO, VolumeQuery(name="disk0", sha256=True),
                             timeout=60)
        dst = await bus.call("h1", storage_api.INFO, VolumeQuery(name="disk1", sha256=True),
                             timeout=60)
        assert src.sha256 == dst.sha256 == sha256_file(Path(src.path))
        assert abs(dst.allocated_bytes - src.allocated_bytes) <= src.allocated_bytes / 100
        vols = await bus.call("h1", storage_api.VOLUMES, ListVolumes())
        assert [v.name for v in vols.volumes] == ["disk0", "disk1"]
        grown = await bus.call("h1", storage_api.RESIZE,
                               ResizeVolume(name="disk1", size_bytes=2 << 30))
        assert grown.virtual_bytes == 2 << 30
        with pytest.raises(BadRequest, match="only growing"):
            await bus.call("h1", storage_api.RESIZE, ResizeVolume(name="disk1",
                                                                   size_bytes=1 << 30))
        await bus.call("h1", storage_api.DELETE, VolumeRef(name="disk1"))
        assert not Path(dst.path).exists()
        text = await asyncio.to_thread(lambda: httpx.get(a.metrics_url, timeout=5).text)
        series = dict(line.rsplit(" ", 1) for line in text.splitlines()
                      if line and not line.startswith("#"))
        assert float(series['phyllome_storage_pool_capacity_bytes{pool="default"}']) == \
            pools.pools[0].capacity_bytes
        assert float(series['phyllome_storage_pool_volumes{pool="default"}']) == 1
        assert 'phyllome_storage_clones_total{method="' in text
        promtool = shutil.which("promtool")
        require(promtool is not None, "promtool (apt prometheus)")
        lint = subprocess.run([str(promtool), "check", "metrics"], input=text, text=True,
                              capture_output=True)
        assert lint.returncode == 0, lint.stdout + lint.stderr


async def test_send_between_two_agents(nats_server, tmp_path: Path) -> None:
    async with agent_in_process("storage", nats_server.url, tmp_path / "h1", "h1") as a, \
            agent_in_process("storage", nats_server.url, tmp_path / "h2", "h2") as b:
        src = await a.bus.call("h1", storage_api.CREATE,
                               CreateVolume(name="vm1", size_bytes=10 << 30))
        make_sparse(Path(src.path), 10 << 30, scatter(10 << 30, 40, 1 << 20))
        acc = await a.bus.call("h1", storage_api.SEND, SendVolume(name="vm1", to_host="h2"))
        st = await finished(a.bus, "h1", acc.job_id)
        assert st.state == "succeeded", st.message
        got = await b.bus.call("h2", storage_api.INFO, VolumeQuery(name="vm1"))
        assert same_sparse_content(Path(src.path), Path(got.path))
        assert got.virtual_bytes == 10 << 30
        assert got.allocated_bytes == os.stat(src.path).st_blocks * 512
        assert st.result["wire_bytes"] <= 1.05 * got.allocated_bytes


async def test_bad_requests_over_the_bus(nats_server, tmp_path: Path) -> None:
    async with agent_in_process("storage", nats_server.url, tmp_path / "h1", "h1") as a:
        bus = a.bus
        for name in ("a/b", "..", "x\x00y", "-x", "x" * 300):
            with pytest.raises(InvalidName):
                await bus.call("h1", storage_api.CREATE, CreateVolume(name=name, size_bytes=512))
        for size in (-1, 0):
            with pytest.raises(BadRequest, match="positive"):
                await bus.call("h1", storage_api.CREATE, CreateVolume(name="d", size_bytes=size))
        with pytest.raises(InsufficientResources, match="beyond pool"):
            await bus.call("h1", storage_api.CREATE, CreateVolume(name="d", size_bytes=1 << 60))
        pool = tmp_path / "h1" / "pools" / "default"
        (pool / "evil").symlink_to("/etc/passwd")
        with pytest.raises(Forbidden, match="symlink"):
            await bus.call("h1", storage_api.INFO, VolumeQuery(name="evil", sha256=True))
        with pytest.raises(Forbidden, match="outside the import directories"):
            await bus.call("h1", storage_api.IMPORT_FILE,
                           ImportVolume(name="x", source="/etc/passwd"))
        assert os.listdir(pool) == ["evil"]


async def test_two_clones_to_one_destination_and_cancel(nats_server, tmp_path: Path) -> None:
    async with agent_in_process("storage", nats_server.url, tmp_path / "h1", "h1") as a:
        bus = a.bus
        src = await bus.call("h1", storage_api.CREATE, CreateVolume(name="src",
                                                                     size_bytes=8 << 30))
        make_sparse(Path(src.path), 8 << 30, scatter(8 << 30, 256, 4 << 20))
        first = await bus.call("h1", storage_api.CLONE, CloneVolume(name="src", dst_name="dst"))
        with pytest.raises(Conflict, match="being created by another request"):
            await bus.call("h1", storage_api.CLONE, CloneVolume(name="src", dst_name="dst"))
        st = await bus.call("h1", storage_api.CANCEL, JobRef(job_id=first.job_id))
        assert st.state == "cancelled", st
        pool = tmp_path / "h1" / "pools" / "default"
        assert sorted(p.name for p in pool.iterdir()) == ["src"]
        again = await bus.call("h1", storage_api.CLONE, CloneVolume(name="src", dst_name="dst"))
        assert (await finished(bus, "h1", again.job_id)).state == "succeeded"


async def test_volume_of_a_running_vm_is_not_touched(nats_server, tmp_path: Path) -> None:
    from shared import subjects
    from shared.codec import encode
    from shared.messages.vm import Disk, VmRecord, VmSpec

    async with agent_in_process("storage", nats_server.url, tmp_path / "h1", "h1") as a:
        bus = a.bus
        disk = await bus.call("h1", storage_api.CREATE, CreateVolume(name="web-disk",
                                                                      size_bytes=1 << 20))
        kv = await bus.kv(subjects.KV_VMS)
        record = VmRecord(spec=VmSpec(name="web", uuid="u1", disks=[Disk(path=disk.path)]),
                          host="h1", state="running")
        await kv.put("u1", encode(record))
        info = await bus.call("h1", storage_api.INFO, VolumeQuery(name="web-disk"))
        assert (info.attached_to, info.attached_state) == ("web", "running")
        for verb, req in (("delete", VolumeRef(name="web-disk")),
                          ("clone", CloneVolume(name="web-disk", dst_name="c")),
                          ("resize", ResizeVolume(name="web-disk", size_bytes=2 << 20)),
                          ("send", SendVolume(name="web-disk", to_host="h2"))):
            with pytest.raises(Conflict, match="is a disk of VM 'web', which is running"):
                await bus.call("h1", contracts.spec("storage", verb), req)
        await kv.put("u1", encode(msgspec.structs.replace(record, state="shutoff")))
        await bus.call("h1", storage_api.DELETE, VolumeRef(name="web-disk"))


async def test_offer_for_a_volume_that_exists_on_the_receiver(nats_server, tmp_path: Path) -> None:
    async with agent_in_process("storage", nats_server.url, tmp_path / "h1", "h1") as a, \
            agent_in_process("storage", nats_server.url, tmp_path / "h2", "h2") as b:
        src = await a.bus.call("h1", storage_api.CREATE, CreateVolume(name="v",
                                                                       size_bytes=1 << 30))
        make_sparse(Path(src.path), 1 << 30, scatter(1 << 30, 4, 1 << 20))
        there = await b.bus.call("h2", storage_api.CREATE, CreateVolume(name="v",
                                                                         size_bytes=1 << 20))
        acc = await a.bus.call("h1", storage_api.SEND, SendVolume(name="v", to_host="h2"))
        st = await finished(a.bus, "h1", acc.job_id)
        assert (st.state, st.error_kind) == ("failed", "conflict"), st
        assert "exists already" in st.message
        assert os.stat(there.path).st_size == 1 << 20  # untouched
        assert sorted(p.name for p in Path(there.path).parent.iterdir()) == ["v"]
        with pytest.raises(Unavailable, match="no storage agent of host 'h9' answers"):
            await a.bus.call("h1", storage_api.SEND, SendVolume(name="v", to_host="h9"))
        with pytest.raises(NotFound, match="host h2 has no pool 'fast' \\(it has default\\)"):
            await a.bus.call("h1", storage_api.SEND, SendVolume(name="v", to_host="h2",
                                                                 dst_pool="fast"))


async def test_offer_too_big_for_the_filesystem_leaves_nothing_held(
        nats_server, tmp_path: Path, small_ext4: Path) -> None:
    pool = small_ext4 / "pool"
    async with agent_in_process("storage", nats_server.url, tmp_path / "h2", "h2",
                                extra={"pools": {"default": str(pool)}}) as b:
        def offer(virtual: int) -> TransferOffer:
            return TransferOffer(
                transfer_id=f"t{virtual}", src_host="h1", src_pool="default", src_name="v",
                pool="default", name="v", virtual_bytes=virtual, extents=[(0, 1 << 20)],
                source_stamp="s")

        # 1 PiB: over ext4's largest file, so making the sparse temporary file fails
        with pytest.raises(BadRequest, match="allows for one file"):
            await b.bus.call("h2", storage_api.RECEIVE, offer(1 << 50))
        assert (await b.bus.call("h2", storage_api.INCOMING, Empty())).transfers == []
        assert list(pool.iterdir()) == []
        accepted = await b.bus.call("h2", storage_api.RECEIVE, offer(1 << 30))  # name free
        assert len(bytes.fromhex(accepted.chunk_key)) == 32


async def test_cli(nats_server, tmp_path: Path) -> None:
    async with agent_in_process("storage", nats_server.url, tmp_path / "h1", "h1"), \
            agent_in_process("storage", nats_server.url, tmp_path / "h2", "h2"):
        async def cli(*args: str) -> tuple[int, str, str]:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "cli.main", "storage", *args, "--host", "h1", "--nats",
                nats_server.url, cwd=REPO, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE)
            out, err = await proc.communicate()
            return proc.returncode or 0, out.decode(), err.decode()

        rc, out, err = await cli("create", "default/disk0", "1G", "--json")
        assert rc == 0, err
        path = Path(json.loads(out)["path"])
        make_sparse(path, 1 << 30, scatter(1 << 30, 4, 1 << 20))
        rc, out, err = await cli("clone", "default/disk0", "disk1", "--json")
        assert rc == 0, err
        assert json.loads(out)["state"] == "succeeded"
        rc, out, err = await cli("info", "disk1", "--sha256", "--json")
        assert rc == 0, err
        info = json.loads(out)
        assert {"pool", "name", "path", "virtual_bytes", "allocated_bytes", "sha256"} <= set(info)
        assert info["sha256"] == sha256_file(path)
        rc, out, err = await cli("volumes", "--json")
        assert [v["name"] for v in json.loads(out)["volumes"]] == ["disk0", "disk1"]
        rc, out, err = await cli("pools")
        assert rc == 0 and "default" in out
        rc, out, err = await cli("create", "default/bad/name", "1G")
        assert rc == 1 and "give POOL/NAME or NAME, a volume name has no '/'" in err
        rc, out, err = await cli("send", "disk1", "--to", "h2", "--bwlimit", "1G", "--json")
        assert rc == 0, err
        sent = json.loads(out)
        assert sent["state"] == "succeeded" and sent["result"]["volume"]["name"] == "disk1"
        rc, out, err = await cli("send", "disk1", "--to", "h2")
        assert rc == 1 and "exists already" in err
        rc, out, err = await cli("delete", "disk1")
        assert rc == 0 and "deleted default/disk1" in out


async def test_send_through_a_server_with_the_default_max_payload(tmp_path: Path) -> None:
    """An external nats-server keeps max_payload at 1 MiB: chunks shrink to fit."""
    from shared.natsserver import NatsServer

    server = NatsServer(tmp_path / "nats", port=-1, extra_conf="max_payload: 1048576\n")
    server.start()
    try:
        async with agent_in_process("storage", server.url, tmp_path / "h1", "h1") as a, \
                agent_in_process("storage", server.url, tmp_path / "h2", "h2") as b:
            assert a.bus.nc.max_payload == 1 << 20
            src = await a.bus.call("h1", storage_api.CREATE,
                                   CreateVolume(name="v", size_bytes=1 << 30))
            make_sparse(Path(src.path), 1 << 30, scatter(1 << 30, 6, 3 << 20))
            acc = await a.bus.call("h1", storage_api.SEND, SendVolume(name="v", to_host="h2"))
            st = await finished(a.bus, "h1", acc.job_id)
            assert st.state == "succeeded", st.message
            got = await b.bus.call("h2", storage_api.INFO, VolumeQuery(name="v"))
            assert same_sparse_content(Path(src.path), Path(got.path))
    finally:
        server.stop()
