"""``kill -9`` of an agent in the middle of its longest job: after a restart nothing half-made
is presented as done.

Other agents' crash tests: the catalogue (tests/reliability/test_catalogue_crash.py: a pull
killed mid-download resumes), the storage transfer (test_storage_transfer_faults.py: sender
or receiver killed), the hardware agent (tests/integration/test_hw_vfio.py: recovery after a
crash mid-bind).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import nats

from shared import subjects
from shared.bus import Bus
from shared.jobs import wait_job
from shared.messages import storage as storage_api
from shared.messages.jobs import JobAccepted
from shared.messages.storage import CloneVolume, CreateVolume, ListVolumes, VolumeList
from shared.natsserver import NatsServer
from tests.support.agents import AgentProcess

MiB = 1 << 20


async def test_storage_killed_mid_clone_leaves_no_volume(nats_server: NatsServer,
                                                         tmp_path: Path) -> None:
    state = tmp_path / "state"
    agent = AgentProcess("storage", nats_server.url, state, "k9")
    await agent.start()
    bus = await Bus.connect(nats_server.url, name="t", host="k9", give_up_after=5)
    try:
        src = await bus.call("k9", storage_api.CREATE,
                             CreateVolume(name="big", size_bytes=8 << 30))
        block = os.urandom(4 * MiB)
        with open(src.path, "r+b") as f:  # 1.5 GiB of data scattered over 8 GiB
            for i in range(384):
                f.seek(i * 20 * MiB)
                f.write(block)
        pool = Path(src.path).parent
        before = set(os.listdir(pool))

        nc = await nats.connect(nats_server.url)
        progressed = asyncio.Event()

        async def on_event(msg: nats.aio.msg.Msg) -> None:
            if b"job.progress.v1" in msg.data:
                progressed.set()

        await nc.subscribe(subjects.events_filter("k9", "storage", "job.*"), cb=on_event)
        accepted: JobAccepted = await bus.call(
            "k9", storage_api.CLONE, CloneVolume(name="big", dst_name="copy"))
        await asyncio.wait_for(progressed.wait(), 60)
        agent.kill()  # SIGKILL mid-copy
        await nc.close()
        assert agent.proc is not None and agent.proc.returncode == -9

        await agent.start()  # the restarted agent cleans up what the dead one left
        listed: VolumeList = await bus.call("k9", storage_api.VOLUMES, ListVolumes())
        assert [v.name for v in listed.volumes] == ["big"], "a half-made clone is listed"
        assert set(os.listdir(pool)) == before, "leftovers of the killed clone remain"

        again: JobAccepted = await bus.call(
            "k9", storage_api.CLONE, CloneVolume(name="big", dst_name="copy"))
        assert again.job_id != accepted.job_id
        outcome = await wait_job(bus, "k9", "storage", again, timeout=120)
        assert outcome.state == "succeeded", outcome.message
    finally:
        await bus.close()
        await agent.stop()
