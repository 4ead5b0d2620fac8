"""The CLI's blocking NATS client (``cli.syncbus``) against a real nats-server and a real
``Bus`` serving: the same request headers and typed replies as ``Bus.call``, and the same
errors (typed, with their origin) for a refusal, no responder, no reply, no server.

A SyncBus blocks, so each call runs in a thread while the serving Bus runs in the loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from cli import status, syncbus
from cli.syncbus import SyncBus
from shared import subjects
from shared.bus import Bus
from shared.errors import BadRequest, Conflict, NotAuthorized, Timeout, Unavailable
from shared.messages import Ack
from shared.messages import net as net_api
from shared.messages.net import NetRef
from shared.natsserver import NatsServer
from tests.support.agents import agent_in_process

pytestmark = [pytest.mark.integration]


@pytest_asyncio.fixture
async def served(nats_server: NatsServer) -> AsyncIterator[tuple[str, list[NetRef]]]:
    """``net_delete`` of host h1 served by a Bus: it acks ``keep``, refuses ``busy`` with a
    Conflict and never answers ``slow``; what it was asked, in order."""
    bus = await Bus.connect(nats_server.url, name="h1-vm", host="h1", give_up_after=5)
    asked: list[NetRef] = []
    done = asyncio.Event()

    async def delete(req: NetRef) -> Ack:
        asked.append(req)
        if req.name == "busy":
            raise Conflict("network busy is used by VM web")
        if req.name == "slow":
            await done.wait()
        return Ack(message=f"deleted {req.name} ({len(asked)})")

    await bus.serve("vm", "0.1.0", [(net_api.NET_DELETE, delete)], metadata={"host": "h1"})
    try:
        yield nats_server.url, asked
    finally:
        done.set()
        await bus.close()


def connect(url: str, **kw: str) -> SyncBus:
    return SyncBus.connect(url, name="test", give_up_after=2, **kw)


async def in_thread(url: str, name: str, **kw: object) -> Ack:
    def go() -> Ack:
        with connect(url) as bus:
            return bus.call("h1", net_api.NET_DELETE, NetRef(name=name), **kw)  # type: ignore[arg-type]

    return await asyncio.to_thread(go)


async def test_a_call_gets_the_typed_reply(served: tuple[str, list[NetRef]]) -> None:
    url, asked = served
    assert await in_thread(url, "keep") == Ack(message="deleted keep (1)")
    assert asked == [NetRef(name="keep")]


async def test_an_idempotency_key_reaches_the_agent_as_with_bus(
        served: tuple[str, list[NetRef]]) -> None:
    url, asked = served
    first = await in_thread(url, "keep", idempotency_key="k1")
    again = await in_thread(url, "keep", idempotency_key="k1")
    assert first == again == Ack(message="deleted keep (1)") and len(asked) == 1
    with pytest.raises(Conflict, match="first used with another request"):
        await in_thread(url, "other", idempotency_key="k1")


async def test_a_refusal_keeps_its_kind_and_origin(served: tuple[str, list[NetRef]]) -> None:
    url, _ = served
    with pytest.raises(Conflict) as e:
        await in_thread(url, "busy")
    assert e.value.origin == "h1/vm.net_delete"
    assert str(e.value) == "vm on h1: network busy is used by VM web"


async def test_no_responder_is_unavailable_at_once(served: tuple[str, list[NetRef]]) -> None:
    url, _ = served
    started = time.monotonic()

    def go() -> None:
        with connect(url) as bus:
            bus.call("h2", net_api.NET_DELETE, NetRef(name="x"), timeout=30)

    with pytest.raises(Unavailable, match=r"no vm agent for host 'h2' answers") as e:
        await asyncio.to_thread(go)
    assert type(e.value) is Unavailable and time.monotonic() - started < 5


async def test_no_reply_in_time_is_a_timeout(served: tuple[str, list[NetRef]]) -> None:
    url, _ = served
    with pytest.raises(Timeout, match=r"no reply on phy.h1.vm.net_delete within 0.3 s"):
        await in_thread(url, "slow", timeout=0.3)


async def test_no_server_or_a_bad_url(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(Unavailable, match="cannot reach NATS at nats://127.0.0.1:1"):
        SyncBus.connect("nats://127.0.0.1:1", name="t", give_up_after=0.3)
    assert time.monotonic() - started < 3
    for url, why in (("http://127.0.0.1:4222", "nats:// or tls://"),
                     ("nats://127.0.0.1:port", "not a number"), (" , ", "no NATS URL")):
        with pytest.raises(BadRequest, match=why):
            SyncBus.connect(url, name="t", give_up_after=0.3)


async def test_a_server_that_is_not_nats(tmp_path: Path) -> None:
    async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"SSH-2.0-OpenSSH_9.2\r\n")
        await writer.drain()
        await reader.read(100)
        writer.close()

    server = await asyncio.start_server(greet, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(Unavailable, match=f"127.0.0.1:{port} does not speak NATS"):
            await asyncio.to_thread(SyncBus.connect, f"nats://127.0.0.1:{port}", name="t",
                                    give_up_after=0.3)
    finally:
        server.close()
        await server.wait_closed()


async def test_jwt_credentials_without_nkeys_say_what_to_use(nats_server: NatsServer,
                                                              tmp_path: Path) -> None:
    creds = tmp_path / "op.creds"
    creds.write_text("-----BEGIN NATS USER JWT-----\nx\n------END NATS USER JWT------\n")
    with pytest.raises(BadRequest, match="PHYLLOME_NATS_USER and PHYLLOME_NATS_PASSWORD"):
        SyncBus.connect(nats_server.url, name="t", give_up_after=2, creds=str(creds))


async def test_kv_reads_live_keys_in_batches(nats_server: NatsServer,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(syncbus, "KV_BATCH", 10)
    bus = await Bus.connect(nats_server.url, name="w", host="h1", give_up_after=5)
    try:
        kv = await bus.kv(subjects.KV_VMS)
        count = 2 * syncbus.KV_BATCH + 5  # three pulls
        for i in range(count):
            await kv.put(f"h1.vm{i}", f"v{i}".encode())
        await kv.put("h1.vm0", b"v0 again")
        await kv.delete("h1.vm1")

        def read() -> tuple[list[tuple[str, int, bytes]], list[tuple[str, int, bytes]],
                            list[tuple[str, int, bytes]]]:
            with connect(nats_server.url) as sync:
                return (sync.kv_entries(subjects.KV_VMS),
                        sync.kv_entries(subjects.KV_VMS, "h1.vm7"), sync.kv_entries("nothing"))

        entries, one, missing = await asyncio.to_thread(read)
        values = {key: value for key, _rev, value in entries}
        assert len(values) == count - 1 and "h1.vm1" not in values
        assert values["h1.vm0"] == b"v0 again" and values["h1.vm2"] == b"v2"
        assert [(k, v) for k, _r, v in one] == [("h1.vm7", b"v7")] and missing == []
        assert await bus.kv_entries(subjects.KV_VMS) and sorted(
            await bus.kv_entries(subjects.KV_VMS)) == sorted(entries)  # as Bus reads it
    finally:
        await bus.close()


async def test_status_ends_when_every_agent_with_a_heartbeat_answered(
        nats_server: NatsServer, tmp_path: Path) -> None:
    async with agent_in_process("storage", nats_server.url, tmp_path / "storage", "h1"):
        started = time.monotonic()
        rows = await asyncio.to_thread(status.collect, nats_server.url, 10.0)
        took = time.monotonic() - started
    assert took < 5, f"waited out the window: {took:.1f} s"
    assert {(r["agent"], r["healthy"]) for r in rows} == {
        ("storage", True), ("vm", False), ("hardware", False), ("catalogue", False)}


async def test_turned_away_says_why(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "nats", port=-1,
                        extra_conf='authorization { users: [{user: "op", password: "right"}] }\n')
    server.start()
    try:
        with pytest.raises(NotAuthorized, match="authorization failed for user 'op'"):
            connect(server.url, user="op", password="wrong")
        with pytest.raises(NotAuthorized, match="a client without credentials"):
            connect(server.url)
        with connect(server.url, user="op", password="right") as bus:
            assert bus.kv_entries(subjects.KV_HOSTS) == []
    finally:
        server.stop()
