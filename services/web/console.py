"""Consoles in the browser: one WebSocket per console, relayed to the VM's host over NATS.

    /api/v1/vms/{vm}/console/vnc      binary frames of the RFB stream (noVNC speaks them)
    /api/v1/vms/{vm}/console/serial   the serial port's bytes (a text frame is sent as UTF-8)

The bearer header or the login cookie authorizes it (``operator``). The gateway asks the vm
agent of the VM's host for a session (``vm.console``) and relays between the WebSocket and
the session's subjects with ``shared.console.ConsoleLink`` (credit-based flow control), so
the console of a VM on host B opens through host A's gateway and no console port leaves B's
loopback. Every open is audited. A refused or ended console closes the WebSocket with a code
a page can act on, and the reason in words:

| code | why |
|---|---|
| 4401 | no token, an unknown one, or the token was revoked while the console was open |
| 4403 | the token's role is below operator |
| 4404 | no such VM |
| 4409 | the VM is not running, or has no such console |
| 4429 | too many bad tokens from this address |
| 4503 | the VM's host does not answer |
| 1000 | the session ended: the VM stopped, the agent drained, the gateway stops |
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Literal

from starlette.websockets import WebSocket, WebSocketDisconnect

from services.web.auth import bearer
from services.web.handlers import Gateway, vm_host
from services.web.wsfast import TAKE
from shared.console import ConsoleLink
from shared.errors import PhyError
from shared.messages import vm as vm_api
from shared.messages.vm import ConsoleOpen, ConsoleSession
from shared.messages.web import TokenRecord

log = logging.getLogger("phyllome.web.console")

Kind = Literal["vnc", "serial"]
CLOSE_CODES = {400: 4400, 401: 4401, 403: 4403, 404: 4404, 409: 4409, 429: 4429, 503: 4503,
               504: 4503}
RECHECK_S = 5.0  # how often an open console's token is looked up again
OPEN_TIMEOUT_S = 15.0


async def refuse(ws: WebSocket, err: PhyError) -> None:
    """Accept only to close with a code and the reason (a refused handshake tells a page
    nothing)."""
    await ws.accept()
    await ws.close(code=CLOSE_CODES.get(err.code, 4500), reason=_reason(err.message))


def _reason(text: str) -> str:
    """A close reason fits in 123 bytes of UTF-8."""
    data = text.encode()
    return text if len(data) <= 123 else data[:120].decode(errors="ignore") + "..."


class Consoles:
    """The WebSocket endpoints of the gateway's consoles."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    async def vnc(self, ws: WebSocket) -> None:
        await self.serve(ws, "vnc")

    async def serial(self, ws: WebSocket) -> None:
        await self.serve(ws, "serial")

    async def serve(self, ws: WebSocket, kind: Kind) -> None:
        gw = self.gw
        remote = ws.client.host if ws.client else ""
        vm = ws.path_params["vm"]
        try:
            who = await gw.auth.identify(ws.headers, ws.cookies, remote=remote)
            gw.auth.require(who, "operator", f"the {kind} console")
            host = await vm_host(gw.bus, vm, ws.query_params.get("host", ""))
            session = await gw.bus.call(host, vm_api.CONSOLE, ConsoleOpen(vm=vm, kind=kind),
                                        timeout=OPEN_TIMEOUT_S)
        except PhyError as e:
            await refuse(ws, e)
            return
        offered = ws.scope.get("subprotocols") or []
        await ws.accept(subprotocol="binary" if "binary" in offered else None)
        await gw.audit(who, "GET", ws.url.path, 101, remote)
        gw.metrics.consoles.labels(kind=kind).inc()
        try:
            code, reason = await self.relay(ws, session, who, bearer(ws.headers, ws.cookies))
        finally:
            gw.metrics.consoles.labels(kind=kind).dec()
        with contextlib.suppress(RuntimeError, WebSocketDisconnect):
            await ws.close(code=code, reason=_reason(reason))
        log.info("%s console of %s (token %s) closed: %s", kind, vm, who.name, reason)

    async def relay(self, ws: WebSocket, session: ConsoleSession, who: TokenRecord,
                    token: str) -> tuple[int, str]:
        gw, kind = self.gw, session.kind
        link = ConsoleLink(gw.bus.nc, send=session.to_vm, recv=session.to_client,
                           window=session.window)
        await link.start(opener=True)
        to_vm = gw.metrics.console_bytes.labels(kind=kind, direction="to_vm")
        to_browser = gw.metrics.console_bytes.labels(kind=kind, direction="to_browser")

        slot = ws.scope.get("extensions", {}).get(TAKE)
        if isinstance(slot, dict):  # a key press goes on in the socket's own callback
            def take(data: bytes) -> bool:
                if not link.send_now(data):
                    return False
                to_vm.inc(len(data))
                return True
            slot["take"] = take

        async def browser_to_vm() -> tuple[int, str]:
            while True:
                msg = await ws.receive()
                if msg["type"] == "websocket.disconnect":
                    return 1000, "the browser closed the console"
                data = msg.get("bytes") or (msg.get("text") or "").encode()
                to_vm.inc(len(data))
                if not link.send_now(data):  # a key press goes out here and now
                    await link.send(data)

        async def send(data: bytes) -> None:
            await ws.send_bytes(data)
            to_browser.inc(len(data))

        async def vm_to_browser() -> tuple[int, str]:
            return 1000, await link.deliver(send)  # in the NATS reader's task: no queue

        async def token_holds() -> tuple[int, str]:
            while True:
                await asyncio.sleep(RECHECK_S)
                try:
                    if await gw.auth.lookup(token) is None:
                        return 4401, f"token {who.name!r} was revoked"
                except PhyError as e:  # KV does not answer now: keep the console, ask again
                    log.debug("token of an open console not checked: %s", e.message)

        async def gateway_stops() -> tuple[int, str]:
            await gw.stopping.wait()
            return 1001, "the web gateway stops; open the console again"

        tasks = [asyncio.create_task(t()) for t in (browser_to_vm, vm_to_browser, token_holds,
                                                    gateway_stops)]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            try:
                code, reason = done.pop().result()
            except (WebSocketDisconnect, RuntimeError):
                code, reason = 1000, "the browser went away"
        finally:
            if isinstance(slot, dict):
                slot.pop("take", None)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await link.close(reason if not link.closed.is_set() else link.reason,
                             tell=not link.closed.is_set())
        return code, reason
