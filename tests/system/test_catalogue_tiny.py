"""The real phyllome-tiny build (deploy/images/) as the catalogue's built-in image, offline."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from shared.messages import Empty
from shared.messages import catalogue as catalogue_api
from shared.messages.catalogue import ImageRef
from shared.natsserver import NatsServer
from tests.support.agents import agent_in_process
from tests.support.tiny import TinyImage

pytestmark = pytest.mark.system
MiB = 1 << 20


async def test_tiny_is_in_the_pool_at_start_and_verified(
        nats_server: NatsServer, tiny_image: TinyImage, tmp_path: Path) -> None:
    builtin = tmp_path / "builtin"
    builtin.mkdir()
    (builtin / "phyllome-tiny").symlink_to(tiny_image.disk.parent)  # as `make up` places it
    published = json.loads(tiny_image.manifest.read_text())["files"]["disk.raw"]
    extra = {"osinfo_dir": "", "probe_interval_s": 0, "builtin_dir": str(builtin),
             "mirrors": {"https://": "http://127.0.0.1:9/"}}  # nothing remote reachable
    async with agent_in_process("catalogue", nats_server.url, tmp_path / "state",
                                extra=extra) as agent:
        [job] = [j for j in (await agent.jobs.jobs(Empty())).jobs if j.kind == "pull"]
        status = await agent.jobs.wait(job.job_id)
        assert status.state == "succeeded", status.message
        info = await agent.bus.call("h1", catalogue_api.INFO, ImageRef(id="phyllome-tiny"))
    assert info.local.state == "ready" and info.sha256 == published["sha256"]
    assert Path(info.path).stat().st_size == published["size"]
    assert hashlib.sha256(Path(info.path).read_bytes()).hexdigest() == published["sha256"]
    t = info.template
    assert (t.firmware, t.secure_boot, t.tpm, t.memory) == ("uefi", True, "2.0", 384 * MiB)
