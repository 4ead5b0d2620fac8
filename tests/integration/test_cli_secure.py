"""Issue 19, secure mode a user can run: the CLI against a TLS nats-server with
least-privilege identities (``shared.security``), as a user runs it.

Turned away (no or wrong credentials) it says so at once and where the CLI's identity is;
no asyncio TLS warning on every command; a verb the identity may not call is refused at
once, naming the identity; ``monitor`` runs the read-only commands; ``up --secure`` will not
pretend while a plain stack runs.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from shared import security, subjects
from shared.bus import Bus
from shared.natsserver import NatsServer
from tests.support.agents import agent_in_process
from tests.support.cli import Stack, cli_env, phyllome

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]
TLS_WARNING = "eof_received()"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def secure(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    """A TLS server with the identities of h1, its streams made by admin (as ``phyllome up
    --secure`` does), and h1's storage agent running as h1-storage."""
    root = tmp_path_factory.mktemp("secure")
    d = root / "state" / "secure"
    security.generate(d, ["h1"])
    server = NatsServer(root / "nats", port=-1, extra_conf=security.server_conf(d))
    server.start()
    try:
        admin_env = security.read_env(d / "admin.env")
        admin = await Bus.connect(server.url, name="admin", host="h1", user="admin",
                                  password=admin_env["PHYLLOME_NATS_PASSWORD"],
                                  ca=admin_env["PHYLLOME_NATS_CA"], give_up_after=5)
        await admin.ensure_stream()
        for bucket in subjects.KV_BUCKETS:
            await admin.kv(bucket)
        await admin.close()
        own = security.read_env(d / "h1-storage.env")
        async with agent_in_process(
                "storage", server.url, root / "storage", "h1",
                nats_user=own["PHYLLOME_NATS_USER"], nats_password=own["PHYLLOME_NATS_PASSWORD"],
                nats_ca=own["PHYLLOME_NATS_CA"]) as agent:
            yield Stack(env=cli_env(server.url, PHYLLOME_STATE_DIR=str(root / "state")),
                        root=root, agents={"storage": agent})
    finally:
        server.stop()


def as_identity(stack: Stack, user: str, **changes: str) -> dict[str, str]:
    return {**stack.env, **security.read_env(stack.root / "state" / "secure" / f"{user}.env"),
            **changes}


async def test_without_or_with_wrong_credentials_the_cli_says_how_to_get_them(
        secure: Stack) -> None:
    hint = f"`set -a; . {secure.root}/state/secure/operator.env; set +a`"
    for env, why in ((secure.env, "its TLS certificate is not trusted (no CA given"),
                     (as_identity(secure, "operator", PHYLLOME_NATS_PASSWORD="wrong"),
                      "authorization failed for user 'operator'")):
        started = time.monotonic()
        done = await phyllome(env, "storage", "pools")
        assert done.rc == 3, done.err
        assert why in done.err and hint in done.err
        assert "TimeoutError" not in done.err and TLS_WARNING not in done.err
        assert time.monotonic() - started < 10, "turned away is an answer, not a wait"


async def test_the_operator_runs_commands_without_tls_warnings(secure: Stack) -> None:
    done = await phyllome(as_identity(secure, "operator"), "storage", "pools")
    assert done.rc == 0, done.err
    assert "default" in done.out and done.err == ""


async def test_a_verb_the_identity_may_not_call_is_refused_at_once(secure: Stack) -> None:
    started = time.monotonic()
    done = await phyllome(as_identity(secure, "monitor"), "storage", "pools", "--timeout", "30")
    assert done.rc == 1, done.err
    assert "phy.h1.storage.pools is not allowed for identity monitor" in done.err
    assert time.monotonic() - started < 15, "not the 30 s request timeout"
    done = await phyllome(as_identity(secure, "monitor"), "storage", "pools", "--json")
    assert done.rc == 1 and '"kind": "forbidden"' in done.err


async def test_monitor_runs_the_read_only_commands(secure: Stack) -> None:
    monitor = as_identity(secure, "monitor")
    for argv, seen in ((["hosts"], "h1"), (["events", "--since", "1h"], "agent.started"),
                       (["vm", "list", "--all"], "NAME")):
        done = await phyllome(monitor, *argv)
        assert (done.rc, done.err) == (0, ""), argv
        assert seen in done.out, argv
    done = await phyllome(monitor, "status", "--json")  # exit 1: h1 runs one agent of four
    assert done.err == ""
    assert [r["agent"] for r in json.loads(done.out) if r["healthy"]] == ["storage"]


async def test_up_secure_refuses_while_a_plain_stack_runs(tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHYLLOME_")}
    env.update(PHYLLOME_STATE_DIR=str(state), PHYLLOME_HOST="plain",
               PHYLLOME_STORAGE_METRICS_PORT="0")
    up = await phyllome(env, "up", "--detach", "--no-demo", "--agents", "storage",
                        "--listen", "127.0.0.1:-1", timeout=150)
    assert up.rc == 0, up.out + up.err
    try:
        again = await phyllome(env, "up", "--secure", "--detach")
        assert again.rc == 1, again.out
        assert "phyllome is running without --secure" in again.err
        assert (f"`phyllome down --state-dir {state} && phyllome up --state-dir {state} "
                "--secure --detach`") in again.err
        plain = await phyllome(env, "up", "--detach")
        assert plain.rc == 0 and "already running" in plain.out
    finally:
        down = await phyllome(env, "down")
        assert down.rc == 0, down.out + down.err
