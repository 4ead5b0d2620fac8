"""``phyllome images`` as a user runs it: a real CLI process against a real agent and NATS."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from shared.agent import Agent
from shared.natsserver import NatsServer
from tests.support.agents import REPO, agent_in_process
from tests.support.httpserver import FileServer, make_sparse_raw

pytestmark = pytest.mark.integration
MiB = 1 << 20


@pytest.fixture
async def agent(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[Agent]:
    extra = {"probe_interval_s": 0, "builtin_dir": str(tmp_path / "builtin")}
    async with agent_in_process("catalogue", nats_server.url, tmp_path / "state",
                                extra=extra) as a:
        yield a


async def phyllome(agent: Agent, *argv: str) -> tuple[int, str, str]:
    env = {**os.environ, "PHYLLOME_HOST": "h1", "PHYLLOME_NATS_URL": agent.cfg.nats_url,
           "COLUMNS": "250"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli.main", "images", *argv, cwd=REPO, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_list_downloadable_shows_the_osinfo_catalogue(agent: Agent) -> None:
    rc, out, err = await phyllome(agent, "list", "--downloadable", "--json")
    assert rc == 0, err
    ids = {i["id"] for i in json.loads(out)["images"]}
    assert {"fedora37", "debian11", "ubuntu22.04"} <= ids and "win11" not in ids
    rc, out, _ = await phyllome(agent, "list", "--downloadable", "--family", "linux",
                                "--arch", "aarch64")
    assert rc == 0 and "fedora37" in out and "Fedora Linux 37" in out
    rc, out, _ = await phyllome(agent, "info", "win11")
    assert rc == 0 and "secure boot" in out and "TPM 2.0" in out


async def test_pull_info_remove_and_refusals(agent: Agent, srv: FileServer) -> None:
    raw = make_sparse_raw(srv.root / "lab.raw", 4 * MiB)
    digest = hashlib.sha256(raw.read_bytes()).hexdigest()
    (srv.root / "m.json").write_text(json.dumps({"images": [
        {"id": "lab", "name": "Lab", "arch": "x86_64", "url": "lab.raw", "format": "raw",
         "sha256": digest, "size": raw.stat().st_size},
        {"id": "nosum", "name": "No sum", "arch": "x86_64", "url": "lab.raw",
         "format": "raw"}]}))
    rc, out, err = await phyllome(agent, "sources", "add", "lab", srv.url("m.json"),
                                  "--type", "manifest")
    assert rc == 0, err
    rc, out, _ = await phyllome(agent, "sources", "--json")
    assert [s["name"] for s in json.loads(out)["sources"]] == ["builtin", "osinfo", "lab"]

    rc, out, err = await phyllome(agent, "pull", "lab")
    assert rc == 0, err
    rc, out, _ = await phyllome(agent, "info", "lab", "--json")
    info = json.loads(out)
    assert info["sha256"] == digest and Path(info["path"]).read_bytes() == raw.read_bytes()

    rc, _, err = await phyllome(agent, "pull", "nosum")
    assert rc == 1 and "--allow-unverified" in err
    rc, _, err = await phyllome(agent, "pull", "../etc/passwd")
    assert rc == 1 and "no path separators" in err
    raw.write_bytes(b"tampered" + raw.read_bytes()[8:])
    rc, _, err = await phyllome(agent, "remove", "lab")
    assert rc == 0, err
    rc, _, err = await phyllome(agent, "pull", "lab")
    assert rc == 1 and "sha256" in err and "refused" in err
    rc, _, err = await phyllome(agent, "sources", "remove", "lab")
    assert rc == 0, err
