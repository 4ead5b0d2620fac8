"""The ``phyllome`` command as a user runs it: a real process against a real stack.

    async def test_x(stack: Stack) -> None:      # the four agents of h1, one set per module
        done = await phyllome(stack.env, "vm", "list", columns=80)
        assert done.rc == 0, done.err

    proc = await start_phyllome(env, "images", "pull", "big")    # to signal it mid-way

A test module that uses ``stack`` runs its tests in the module's event loop:
``pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_asyncio

from shared.agent import Agent
from shared.natsserver import NatsServer
from tests.support.agents import REPO, agent_in_process
from tests.support.libvirt import TEST_HOST_XML
from tests.support.sysfs_tree import FIXTURES, build

HOST = "h1"


@dataclass(frozen=True)
class Done:
    """How a ``phyllome`` process ended."""

    rc: int
    out: str
    err: str


@dataclass
class Stack:
    """The agents of one host, and the environment a CLI run against them gets."""

    env: dict[str, str]
    root: Path
    agents: dict[str, Agent] = field(default_factory=dict)


def cli_env(nats_url: str, **extra: str) -> dict[str, str]:
    """The environment of a CLI run on host ``h1`` (no credentials but those in ``extra``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHYLLOME_")}
    return {**env, "PHYLLOME_HOST": HOST, "PHYLLOME_NATS_URL": nats_url, **extra}


async def start_phyllome(env: dict[str, str], *argv: str,
                         columns: int = 200) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli.main", *argv, cwd=REPO, env={**env, "COLUMNS": str(columns)},
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)


async def phyllome(env: dict[str, str], *argv: str, columns: int = 200,
                   timeout: float = 60.0) -> Done:
    """Run ``phyllome ARGV`` to its end."""
    proc = await start_phyllome(env, *argv, columns=columns)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return Done(proc.returncode, out.decode(), err.decode())


@contextlib.asynccontextmanager
async def cli_stack(root: Path, nats_url: str, libvirt_uri: str,
                    agents: tuple[str, ...] = ("hardware", "storage", "catalogue", "vm"),
                    **vm: object) -> AsyncIterator[Stack]:
    """The real agents of host ``h1`` in this event loop: hardware on a fixture sysfs tree,
    storage with its default pool, the catalogue with osinfo-db and no built-in images, the
    vm agent on libvirt's test driver (``vm`` overrides its settings). The vm agent's KVM
    boot probe runs and fails (there is no probe guest), so VMs get TCG, as on a host where
    KVM hangs guests."""
    stack = Stack(env=cli_env(nats_url), root=root)
    settings = {
        "hardware": {"sysfs_root": str(build(root / "sys", FIXTURES["intel-desktop"]()).root),
                     "extra": {"proc_root": str(_dir(root / "proc"))}},
        "storage": {},
        "catalogue": {"extra": {"probe_interval_s": 0, "builtin_dir": str(root / "builtin")}},
        "vm": {"libvirt_uri": libvirt_uri, "accelerator": "auto",
               "extra": {"reconcile_s": 3600}, **vm},
    }
    async with contextlib.AsyncExitStack() as running:
        for name in agents:
            stack.agents[name] = await running.enter_async_context(agent_in_process(
                name, nats_url, root / name, HOST, **settings[name]))  # type: ignore[arg-type]
        yield stack


def _dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    """NATS and the four agents of h1 (``cli_stack``), shared by a test module."""
    root = tmp_path_factory.mktemp("cli")
    server = NatsServer(root / "nats", port=-1)
    server.start()
    (root / "libvirt-test-host.xml").write_text(TEST_HOST_XML)
    try:
        async with cli_stack(root, server.url, f"test://{root}/libvirt-test-host.xml") as s:
            yield s
    finally:
        server.stop()
