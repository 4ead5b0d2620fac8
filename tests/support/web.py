"""The web gateway under test: in this process, on a free port, against a real nats-server.

    async with gateway_in_process(nats_server.url) as gw, httpx.AsyncClient(
            base_url=gw.url) as http:
        token = await make_token(gw, "op", "operator")
        r = await http.get("/api/v1/vms", headers=bearer(token))
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from services.web.config import load
from services.web.service import WebGateway
from shared import tokens
from shared.bus import Bus
from shared.messages.web import Role


@contextlib.asynccontextmanager
async def gateway_in_process(nats_url: str, host: str = "h1",
                             **overrides: Any) -> AsyncIterator[WebGateway]:
    cfg = load({"PHYLLOME_HOST": host, "PHYLLOME_NATS_URL": nats_url,
                "PHYLLOME_WEB_LISTEN": "127.0.0.1:0"})
    gateway = WebGateway(msgspec.structs.replace(cfg, **overrides))
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.close()


async def make_token(bus: Bus, name: str, role: Role) -> str:
    token, _record = await tokens.create(bus, name, role)
    return token


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}
