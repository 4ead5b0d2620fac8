"""The web gateway's NATS identity against a real nats-server with TLS: it reads the tokens,
calls what the operator may, publishes its own audit events and nothing else; the operator
writes the tokens."""

from __future__ import annotations

import httpx
import nats.errors
import pytest

from shared import subjects, tokens
from shared.messages.web import WebAudit
from tests.integration.test_security import connect, connect_bus, secure, set_up_streams
from tests.support.web import gateway_in_process

__all__ = ["connect", "secure"]
pytestmark = pytest.mark.integration


async def test_web_identity_reads_tokens_publishes_audits_and_nothing_else(
        secure, connect) -> None:  # type: ignore[no-untyped-def]
    server, d, users = secure
    await set_up_streams(server, d)
    operator = await connect_bus(server, d, "operator")
    token, record = await tokens.create(operator, "ui", "viewer")  # the operator writes them
    await operator.close()

    web = await connect_bus(server, d, "h1-web")
    try:
        assert await tokens.lookup(web, token) == record
        assert await web.publish_event(subjects.web_event("h1", "audit"), WebAudit(
            host="h1", token="ui", role="viewer", method="POST", path="/x", status=403))
        assert not await web.publish_event(subjects.web_event("h2", "audit"), WebAudit(
            host="h2", token="ui", role="viewer", method="POST", path="/x", status=403),
            timeout=1)
    finally:
        await web.close()

    conn = await connect("h1-web")
    with pytest.raises(nats.errors.NoRespondersError):
        await conn.nc.request("phy.h1.vm.list", b"", timeout=2)  # allowed, nobody serves it
    for subject in ("phy.evt.h1.vm.state.x", f"$KV.{subjects.KV_WEB_TOKENS}.x",
                    f"$KV.{subjects.KV_VMS}.x", "phy.h1.vm.import_state",
                    "phy.h2.storage.receive_commit"):
        conn.errors.clear()
        await conn.nc.publish(subject, b"{}")
        await conn.wait_error("permissions violation for publish")


async def test_the_gateway_serves_as_its_own_identity(secure) -> None:  # type: ignore[no-untyped-def]
    server, d, _users = secure
    await set_up_streams(server, d)
    operator = await connect_bus(server, d, "operator")
    token, _record = await tokens.create(operator, "ops", "operator")
    env = {k.removeprefix("PHYLLOME_").lower(): v for k, v in
           (line.split("=", 1) for line in (d / "h1-web.env").read_text().splitlines())}
    try:
        async with gateway_in_process(server.url, "h1", **env) as gw, httpx.AsyncClient(
                base_url=gw.url, headers={"authorization": f"Bearer {token}"}) as http:
            r = await http.get("/api/v1/vms")  # KV vms and hosts, as h1-web
            assert (r.status_code, r.json()["vms"]) == (200, []), r.text
            r = await http.post("/api/v1/vms/ghost/start")
            assert r.status_code == 404, r.text
        audits = [e async for e in operator.events(subjects.web_event("h1", "audit"))]
        assert len(audits) == 1 and b'"path":"/api/v1/vms/ghost/start"' in audits[0][2]
    finally:
        await operator.close()
