"""Least-privilege identities against a real nats-server with TLS: each tries what it must
not do and is refused; each can do its job."""

from __future__ import annotations

import asyncio
import os
import ssl
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgspec
import nats
import nats.errors
import pytest

from shared import security, subjects
from shared.bus import Bus
from shared.errors import Unavailable
from shared.messages import AgentStopping, Empty, Heartbeat
from shared.messages import storage as storage_api
from shared.natsserver import NatsServer
from tests.support.agents import REPO, agent_in_process
from tests.support.wait import until


@pytest.fixture
def secure(tmp_path: Path) -> Iterator[tuple[NatsServer, Path, dict[str, str]]]:
    d = tmp_path / "secure"
    users = security.generate(d, ["h1", "h2"])
    server = NatsServer(tmp_path / "nats", port=-1, extra_conf=security.server_conf(d))
    server.start()
    yield server, d, users
    server.stop()


class Conn:
    """A client of one identity that records the server's permission errors."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.nc: nats.NATS | None = None

    async def open(self, url: str, user: str, password: str, ca: Path) -> Conn:
        async def on_error(e: Exception) -> None:
            self.errors.append(str(e))

        ctx = ssl.create_default_context(cafile=str(ca))
        self.nc = await nats.connect(url, user=user, password=password, tls=ctx,
                                     error_cb=on_error, allow_reconnect=False)
        return self

    async def wait_error(self, text: str, timeout: float = 5.0) -> None:
        await until(f"the server to say '{text}' (so far: {self.errors})",
                    lambda: any(text in e.lower() for e in self.errors), timeout, 0.02)


@pytest.fixture
async def connect(secure) -> AsyncIterator:  # type: ignore[no-untyped-def]
    server, d, users = secure
    opened: list[Conn] = []

    async def open_as(user: str) -> Conn:
        conn = await Conn().open(server.url, user, users[user], d / "ca.pem")
        opened.append(conn)
        return conn

    yield open_as
    for c in opened:
        if c.nc is not None and not c.nc.is_closed:
            await c.nc.close()


async def test_anonymous_and_plaintext_are_refused(secure) -> None:  # type: ignore[no-untyped-def]
    server, d, users = secure
    with pytest.raises((nats.errors.Error, OSError)):
        await nats.connect(server.url, allow_reconnect=False, connect_timeout=2)
    with pytest.raises((nats.errors.Error, OSError)):
        ctx = ssl.create_default_context(cafile=str(d / "ca.pem"))
        await nats.connect(server.url, tls=ctx, allow_reconnect=False, connect_timeout=2)
    with pytest.raises((nats.errors.Error, OSError)):
        ctx = ssl.create_default_context(cafile=str(d / "ca.pem"))
        await nats.connect(server.url, tls=ctx, user="h1-vm", password="wrong",
                           allow_reconnect=False, connect_timeout=2)


async def test_admin_sets_up_then_agents_run_with_their_own_identity(
        secure, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server, d, users = secure
    admin = await Bus.connect(server.url, name="admin", host="h1", user="admin",
                              password=users["admin"], ca=str(d / "ca.pem"), give_up_after=5)
    await admin.ensure_stream()
    for bucket in (subjects.KV_HOSTS, subjects.KV_VMS, subjects.KV_IMAGES):
        await admin.kv(bucket)
    env = security.read_env(d / "h1-storage.env")
    async with agent_in_process("storage", server.url, tmp_path / "st", "h1",
                                nats_user=env["PHYLLOME_NATS_USER"],
                                nats_password=env["PHYLLOME_NATS_PASSWORD"],
                                nats_ca=env["PHYLLOME_NATS_CA"]) as agent:
        op_env = security.read_env(d / "operator.env")
        operator = await Bus.connect(server.url, name="cli", host="h1",
                                     user="operator", password=op_env["PHYLLOME_NATS_PASSWORD"],
                                     ca=op_env["PHYLLOME_NATS_CA"], give_up_after=5)
        pools = await operator.call("h1", storage_api.POOLS, Empty())
        assert pools.pools, "the storage agent answered its own command as h1-storage"
        beats = await operator.kv_values(subjects.KV_HOSTS, Heartbeat)
        assert [(b.host, b.agent) for b in beats] == [("h1", "storage")]
        started = [s async for s, _t, _d in operator.events("phy.evt.h1.storage.agent.started")]
        assert started, "the agent's own event was stored"
        assert agent.metrics.events_failed._value.get() == 0
        await operator.nc.close()
    await admin.nc.close()


async def test_agent_cannot_publish_another_agents_event_or_serve_its_subjects(
        connect) -> None:  # type: ignore[no-untyped-def]
    storage = await connect("h1-storage")
    monitor = await connect("monitor")
    seen: list[str] = []

    async def record(msg: nats.aio.msg.Msg) -> None:
        seen.append(msg.subject)

    await monitor.nc.subscribe("phy.evt.>", cb=record)
    await monitor.nc.flush()
    event = msgspec.json.encode(AgentStopping(host="h1", agent="vm"))
    await storage.nc.publish("phy.evt.h1.vm.state.x", event)
    await storage.wait_error("permissions violation for publish")
    storage.errors.clear()
    await storage.nc.publish("phy.evt.h2.storage.volume", event)  # another host's storage
    await storage.wait_error("permissions violation for publish")
    storage.errors.clear()
    await storage.nc.subscribe("phy.h1.vm.start")
    await storage.wait_error("permissions violation for subscription")
    storage.errors.clear()
    await storage.nc.publish(f"$KV.{subjects.KV_HOSTS}.h1.vm", b"{}")  # another's heartbeat
    await storage.wait_error("permissions violation for publish")
    storage.errors.clear()
    await storage.nc.publish(f"$KV.{subjects.KV_IMAGES}.evil", b"{}")
    await storage.wait_error("permissions violation for publish")
    await storage.nc.publish("phy.evt.h1.storage.volume", event)  # its own: allowed
    await storage.nc.flush()
    await until("the storage agent's own event", lambda: "phy.evt.h1.storage.volume" in seen,
                timeout=5, interval=0.02)
    assert seen == ["phy.evt.h1.storage.volume"]


async def test_kv_an_agent_has_no_business_with_is_refused(connect) -> None:  # type: ignore[no-untyped-def]
    hw = await connect("h1-hardware")
    js = hw.nc.jetstream(timeout=2)
    with pytest.raises(Exception):  # noqa: B017 - a timeout or a permission error
        kv = await js.key_value(subjects.KV_IMAGES)
        await kv.get("anything")
    await hw.wait_error("permissions violation for publish")


async def test_operator_requests_but_cannot_publish_events_or_write_kv(connect) -> None:  # type: ignore[no-untyped-def]
    op = await connect("operator")
    await op.nc.publish("phy.evt.h1.vm.state.x", b"{}")
    await op.wait_error("permissions violation for publish")
    op.errors.clear()
    await op.nc.publish(f"$KV.{subjects.KV_VMS}.x", b"{}")
    await op.wait_error("permissions violation for publish")
    op.errors.clear()
    with pytest.raises(nats.errors.NoRespondersError):
        await op.nc.request("phy.h1.vm.list", b"", timeout=2)  # allowed, nobody serves it
    await op.nc.subscribe("phy.evt.>")
    await op.wait_error("permissions violation for subscription")


async def test_monitor_may_only_read(connect) -> None:  # type: ignore[no-untyped-def]
    mon = await connect("monitor")
    await mon.nc.publish("phy.h1.vm.delete", b"{}")
    await mon.wait_error("permissions violation for publish")
    mon.errors.clear()
    await mon.nc.publish("phy.evt.h1.vm.state.x", b"{}")
    await mon.wait_error("permissions violation for publish")


def test_roles_are_what_the_docs_say() -> None:
    p = security.permissions("vm", "h1")
    assert p["subscribe"]["allow"][0] == "phy.h1.vm.*"
    assert "phy.evt.h1.vm.>" in p["publish"]["allow"]
    assert not any(s.startswith("phy.evt.h1.storage") for s in p["publish"]["allow"])
    with pytest.raises(ValueError):
        security.permissions("root")
    with pytest.raises(Exception, match="is not valid"):
        security.permissions("vm", "bad.host")


async def test_cli_with_wrong_credentials_exits_unreachable(secure) -> None:  # type: ignore[no-untyped-def]
    server, d, users = secure
    with pytest.raises(Unavailable, match="cannot connect to NATS"):
        await Bus.connect(server.url, name="cli", host="h1", user="operator",
                          password="wrong", ca=str(d / "ca.pem"), give_up_after=5)
    env = {**os.environ, "PHYLLOME_NATS_URL": server.url, "PHYLLOME_NATS_USER": "operator",
           "PHYLLOME_NATS_PASSWORD": "wrong", "PHYLLOME_NATS_CA": str(d / "ca.pem")}
    cli = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli.main", "status", cwd=REPO, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(cli.communicate(), 60)
    assert cli.returncode == 3 and "cannot connect to NATS" in err.decode(), err.decode()
