"""``phyllome jobs`` as a user runs it: a real CLI process against real agents of two hosts
(a catalogue and a storage agent on h1, a storage agent on h2), a real NATS and a real HTTP
mirror that serves slowly enough for a pull to be caught running."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from shared.agent import Agent
from shared.jobs import wait_job
from shared.messages import catalogue as catalogue_api
from shared.messages import storage as storage_api
from shared.messages.catalogue import PullRequest, SourceAdd
from shared.messages.jobs import JobRef
from shared.messages.storage import CloneVolume, CreateVolume
from shared.natsserver import NatsServer
from tests.support.agents import REPO, agent_in_process
from tests.support.httpserver import FileServer, make_sparse_raw
from tests.support.wait import until

pytestmark = pytest.mark.integration
MiB = 1 << 20


class Stack:
    def __init__(self, url: str, catalogue: Agent, h2_storage: Agent, srv: FileServer) -> None:
        self.url, self.catalogue, self.h2_storage, self.srv = url, catalogue, h2_storage, srv

    async def start(self, *argv: str) -> asyncio.subprocess.Process:
        env = {**os.environ, "PHYLLOME_HOST": "h1", "PHYLLOME_NATS_URL": self.url,
               "COLUMNS": "250"}
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cli.main", "jobs", *argv, cwd=REPO, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)

    async def phyllome(self, *argv: str) -> tuple[int, str, str]:
        return await ended(await self.start(*argv))

    def asked(self, verb: str) -> float:
        """How often the catalogue agent answered ``verb`` successfully."""
        value = self.catalogue.registry.get_sample_value(
            "phyllome_catalogue_requests_total", {"endpoint": verb, "outcome": "ok"})
        return value or 0.0

    async def pull(self, ident: str) -> str:
        """Start a pull; at the mirror's slow rate it runs for a minute unless sped up."""
        accepted = await self.catalogue.bus.call("h1", catalogue_api.PULL, PullRequest(id=ident))
        return accepted.job_id


async def ended(proc: asyncio.subprocess.Process) -> tuple[int, str, str]:
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture
async def stack(nats_server: NatsServer, tmp_path: Path, srv: FileServer
                ) -> AsyncIterator[Stack]:
    images = []
    for ident in ("slow", "second", "third"):
        raw = make_sparse_raw(srv.root / f"{ident}.raw", 16 * MiB)
        images.append({"id": ident, "name": ident, "arch": "x86_64", "url": raw.name,
                       "format": "raw", "size": raw.stat().st_size,
                       "sha256": hashlib.sha256(raw.read_bytes()).hexdigest()})
    (srv.root / "m.json").write_text(json.dumps({"images": images}))
    extra = {"osinfo_dir": "", "probe_interval_s": 0, "auto_pull": []}
    async with agent_in_process("catalogue", nats_server.url, tmp_path / "h1", "h1",
                                extra=extra) as catalogue, \
            agent_in_process("storage", nats_server.url, tmp_path / "h1", "h1"), \
            agent_in_process("storage", nats_server.url, tmp_path / "h2", "h2") as h2:
        await catalogue.bus.call("h1", catalogue_api.SOURCE_ADD,
                                 SourceAdd(name="m", url=srv.url("m.json")))
        yield Stack(nats_server.url, catalogue, h2, srv)


def by_id(listing: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {j["job_id"]: j for j in listing["jobs"]}


async def test_jobs_list_show_cancel_watch(stack: Stack) -> None:
    await stack.h2_storage.bus.call("h2", storage_api.CREATE,
                                    CreateVolume(name="base", size_bytes=4 * MiB))
    clone = await stack.h2_storage.bus.call("h2", storage_api.CLONE,
                                            CloneVolume(name="base", dst_name="copy"))
    assert (await wait_job(stack.h2_storage.bus, "h2", "storage", clone.job_id, timeout=120)
            ).state == "succeeded"
    stack.srv.rate = MiB // 4
    slow = await stack.pull("slow")

    # list: this host's agents by default, every host's with --all
    rc, out, err = await stack.phyllome("list", "--json")
    assert rc == 0, err
    jobs = by_id(json.loads(out))
    assert set(jobs) == {slow}
    assert {k: jobs[slow][k] for k in ("host", "agent", "kind", "state")} == {
        "host": "h1", "agent": "catalogue", "kind": "pull", "state": "running"}
    rc, out, err = await stack.phyllome("list", "--all", "--json")
    assert rc == 0, err
    jobs = by_id(json.loads(out))
    assert set(jobs) == {slow, clone.job_id}
    assert (jobs[clone.job_id]["host"], jobs[clone.job_id]["agent"]) == ("h2", "storage")
    rc, out, err = await stack.phyllome("list", "--all")
    assert rc == 0, err
    lines = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert lines[slow][1:5] == ["h1", "catalogue", "pull", "running"]
    assert lines[clone.job_id][1:5] == ["h2", "storage", "clone", "succeeded"]

    # show: found on whichever agent has it; another host's job needs --all
    rc, out, err = await stack.phyllome("show", slow, "--json")
    assert rc == 0, err
    shown = json.loads(out)
    assert (shown["agent"], shown["state"]) == ("catalogue", "running")
    assert shown["kind"] == "pull" and shown["started"] > 0
    rc, _, err = await stack.phyllome("show", clone.job_id)
    assert rc == 1 and "no job" in err and "add --all" in err
    rc, out, err = await stack.phyllome("show", clone.job_id, "--all")
    assert rc == 0 and "succeeded" in out, err
    rc, _, err = await stack.phyllome("show", "nope", "--all")
    assert rc == 1 and "no job 'nope' on any host" in err

    # cancel: the agent stops and rolls back; cancelling again changes nothing; a job that
    # ended otherwise has nothing left to cancel
    rc, out, err = await stack.phyllome("cancel", slow, "--json")
    assert rc == 0, err
    assert json.loads(out)["state"] == "cancelled"
    assert stack.catalogue.jobs.get(slow).state == "cancelled"
    rc, out, err = await stack.phyllome("cancel", slow)
    assert rc == 0 and "cancelled" in out, err
    rc, _, err = await stack.phyllome("cancel", clone.job_id, "--all")
    assert rc == 1 and "had already succeeded: nothing to cancel" in err

    # watch: a finished job shows its outcome at once; a running one is followed to its end
    rc, out, err = await stack.phyllome("watch", clone.job_id, "--all", "--json")
    assert rc == 0, err
    assert json.loads(out)["state"] == "succeeded"
    second = await stack.pull("second")
    asked = stack.asked("job")
    watch = await stack.start("watch", second)
    await until("the watcher to ask for the job", lambda: stack.asked("job") > asked)
    stack.srv.rate = None  # it saw the job running; now let it end
    rc, out, err = await ended(watch)
    assert rc == 0, err
    assert "pull: done" in out
    assert stack.catalogue.jobs.get(second).state == "succeeded"

    stack.srv.rate = MiB // 4
    third = await stack.pull("third")
    watch = await stack.start("watch", third, "--json")
    await stack.catalogue.bus.call("h1", catalogue_api.CANCEL, JobRef(job_id=third))
    rc, out, err = await ended(watch)
    assert rc == 1
    assert json.loads(out)["state"] == "cancelled"


async def test_jobs_of_a_host_without_agents_is_unreachable(stack: Stack) -> None:
    rc, _, err = await stack.phyllome("list", "--host", "nohost")
    assert rc == 3 and "no agent of host 'nohost' answers" in err
    rc, out, err = await stack.phyllome("list")
    assert rc == 0 and "no jobs on host h1" in out, err
    rc, _, err = await stack.phyllome("watch")
    assert rc == 2 and "ID" in err
