"""The storage agent on a real nats-server: endpoints, jobs, events, VMs holding volumes."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import pytest

from shared.bus import Bus
from shared.errors import BadRequest
from shared.messages import Empty
from shared.messages.jobs import JobRef, JobStatus
from shared.messages.storage import (
    CloneVolume,
    CreateVolume,
    ListVolumes,
    ResizeVolume,
    SendVolume,
    VolumeQuery,
    VolumeRef,
)
from tests.support.agents import agent_in_process
from tests.support.loopfs import make_sparse, same_sparse_content, scatter
from tests.support.nats import nats_server  # noqa: F401

pytestmark = pytest.mark.integration


async def finished(bus: Bus, host: str, job_id: str, timeout: float = 60) -> JobStatus:
    """Poll the job until it is no longer running."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        st: JobStatus = await bus.call(host, "storage", "job", JobRef(job_id=job_id))
        if st.state != "running":
            return st
        assert asyncio.get_running_loop().time() < deadline, f"job {job_id} still running"
        await asyncio.sleep(0.05)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


async def test_create_clone_info_delete(nats_server, tmp_path: Path) -> None:  # noqa: F811
    async with agent_in_process("storage", nats_server.url, tmp_path / "h1", "h1") as a:
        bus = a.bus
        pools = await bus.call("h1", "storage", "pools", Empty())
        assert [p.name for p in pools.pools] == ["default"]
        assert pools.pools[0].path == str(tmp_path / "h1" / "pools" / "default")
        info = await bus.call("h1", "storage", "create",
                              CreateVolume(name="disk0", size_bytes=1 << 30))
        assert (info.virtual_bytes, info.allocated_bytes) == (1 << 30, 0)
        make_sparse(Path(info.path), 1 << 30, scatter(1 << 30, 8, 1 << 20))
        acc = await bus.call("h1", "storage", "clone",
                             CloneVolume(name="disk0", dst_name="disk1"))
        st = await finished(bus, "h1", acc.job_id)
        assert st.state == "succeeded", st.message
        assert st.result["method"] in ("reflink", "copy")
        src = await bus.call("h1", "storage", "info", VolumeQuery(name="disk0", sha256=True),
                             timeout=60)
        dst = await bus.call("h1", "storage", "info", VolumeQuery(name="disk1", sha256=True),
                             timeout=60)
        assert src.sha256 == dst.sha256 == sha256_file(Path(src.path))
        assert abs(dst.allocated_bytes - src.allocated_bytes) <= src.allocated_bytes / 100
        vols = await bus.call("h1", "storage", "volumes", ListVolumes())
        assert [v.name for v in vols.volumes] == ["disk0", "disk1"]
        grown = await bus.call("h1", "storage", "resize",
                               ResizeVolume(name="disk1", size_bytes=2 << 30))
        assert grown.virtual_bytes == 2 << 30
        with pytest.raises(BadRequest, match="only growing"):
            await bus.call("h1", "storage", "resize", ResizeVolume(name="disk1",
                                                                   size_bytes=1 << 30))
        await bus.call("h1", "storage", "delete", VolumeRef(name="disk1"))
        assert not Path(dst.path).exists()


async def test_send_between_two_agents(nats_server, tmp_path: Path) -> None:  # noqa: F811
    async with agent_in_process("storage", nats_server.url, tmp_path / "h1", "h1") as a, \
            agent_in_process("storage", nats_server.url, tmp_path / "h2", "h2") as b:
        src = await a.bus.call("h1", "storage", "create",
                               CreateVolume(name="vm1", size_bytes=10 << 30))
        make_sparse(Path(src.path), 10 << 30, scatter(10 << 30, 40, 1 << 20))
        acc = await a.bus.call("h1", "storage", "send", SendVolume(name="vm1", to_host="h2"))
        st = await finished(a.bus, "h1", acc.job_id)
        assert st.state == "succeeded", st.message
        got = await b.bus.call("h2", "storage", "info", VolumeQuery(name="vm1"))
        assert same_sparse_content(Path(src.path), Path(got.path))
        assert got.virtual_bytes == 10 << 30
        assert got.allocated_bytes == os.stat(src.path).st_blocks * 512
        assert st.result["wire_bytes"] <= 1.05 * got.allocated_bytes
