"""The catalogue agent killed (SIGKILL) mid-pull: the next pull resumes the download."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from shared.bus import Bus
from shared.jobs import wait_job
from shared.messages import catalogue as catalogue_api
from shared.messages.catalogue import ImageRef, PullRequest, SourceAdd
from shared.natsserver import NatsServer
from tests.support.agents import AgentProcess
from tests.support.httpserver import FileServer, make_sparse_raw
from tests.support.wait import until

pytestmark = pytest.mark.reliability
MiB = 1 << 20


async def test_killed_mid_pull_then_resumed(nats_server: NatsServer, tmp_path: Path) -> None:
    www = tmp_path / "www"
    www.mkdir()
    raw = make_sparse_raw(www / "big.raw", 24 * MiB)
    digest = hashlib.sha256(raw.read_bytes()).hexdigest()
    (www / "m.json").write_text(json.dumps({"images": [
        {"id": "big", "name": "Big", "arch": "x86_64", "url": "big.raw", "format": "raw",
         "sha256": digest, "size": raw.stat().st_size}]}))
    config = tmp_path / "phyllome.toml"
    config.write_text(f'[catalogue]\nosinfo_dir = ""\nprobe_interval_s = 0\n'
                      f'builtin_dir = "{tmp_path / "builtin"}"\n')
    state = tmp_path / "state"
    with FileServer(www) as srv:
        agent = AgentProcess("catalogue", nats_server.url, state, PHYLLOME_CONFIG=str(config))
        await agent.start()
        bus = await Bus.connect(nats_server.url, name="test", host="h1", give_up_after=5)
        try:
            await bus.call("h1", catalogue_api.SOURCE_ADD,
                           SourceAdd(name="m", url=srv.url("m.json")))
            srv.rate = 4 * MiB
            await bus.call("h1", catalogue_api.PULL, PullRequest(id="big"))
            partial = state / "images/pool/.partial"
            await until("4 MiB downloaded before the kill", lambda: sum(
                p.stat().st_size for p in partial.glob("*.download")) >= 4 * MiB, timeout=30)
            agent.kill()
            kept = sum(p.stat().st_size for p in partial.glob("*.download"))

            srv.rate = None
            await agent.start()
            accepted = await bus.call("h1", catalogue_api.PULL, PullRequest(id="big"))
            status = await wait_job(bus, "h1", "catalogue", accepted, timeout=60)
            assert status.state == "succeeded", status.message + agent.log()
            resumed = srv.gets("big.raw")[-1]
            assert resumed.startswith("bytes=") and int(resumed[6:-1]) >= kept
            info = await bus.call("h1", catalogue_api.INFO, ImageRef(id="big"))
            assert info.sha256 == digest and list(partial.iterdir()) == []
            assert await agent.stop() == 0
        finally:
            agent.kill()
            await bus.close()
