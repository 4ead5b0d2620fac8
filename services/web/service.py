"""Wiring of the web gateway: the bus, the route table as an ASGI app, uvicorn, the drain.

Every route of ``handlers.ROUTES`` is served the same way: the token is checked against the
role the route needs, the parameters and body are read (within the route's size), the
handler runs, the answer or the typed error (``error.v1``) goes out with its status, the
request is counted, and a mutating call publishes an audit event naming its token. Routes
that match nothing are JSON 404s; the UI is static files beside it::

    gateway = WebGateway(load())
    await gateway.start()          # connected to NATS, listening; gateway.url
    await gateway.stopping.wait()
    await gateway.close()          # event streams end, requests finish, the bus drains
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, WebSocketRoute
from starlette.routing import Route as HttpRoute
from starlette.staticfiles import StaticFiles

from services.web.auth import Auth
from services.web.config import WebConfig, load
from services.web.console import Consoles
from services.web.handlers import ROUTES, Answer, Call, Gateway, Route, forward
from services.web.metrics import UNMATCHED, WebMetrics
from services.web.wsfast import DirectWebSockets
from shared import __version__, subjects
from shared.bus import Bus
from shared.codec import encode
from shared.errors import (
    Internal,
    InvalidMessage,
    NotFound,
    PayloadTooLarge,
    PhyError,
    TooManyRequests,
    to_reply,
)
from shared.messages.web import TokenRecord
from shared.runtime import run_loop, setup_logging

log = logging.getLogger("phyllome.web")
STATIC = Path(__file__).resolve().parent / "static"
SHUTDOWN_GRACE_S = 5
# The UI's page: its own scripts and styles only, not framed by another site.
PAGE_HEADERS = {
    "cache-control": "no-cache",
    "content-security-policy": "default-src 'self'; img-src 'self' data:; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "x-content-type-options": "nosniff", "referrer-policy": "same-origin"}


# -- one request -----------------------------------------------------------------------------


def error_response(err: PhyError) -> Response:
    status = err.code if 400 <= err.code <= 599 else 500
    headers = {}
    if status == 401:
        headers["www-authenticate"] = 'Bearer realm="phyllome"'
    if isinstance(err, TooManyRequests):
        headers["retry-after"] = str(max(1, math.ceil(err.retry_after)))
    return Response(to_reply(err)[1], status, headers=headers, media_type="application/json")


def render(answer: Answer, status: int) -> Response:
    if answer.stream is not None:
        return StreamingResponse(answer.stream, status_code=answer.status or status,
                                 headers=answer.headers, media_type=answer.media_type)
    body = answer.body if isinstance(answer.body, bytes) else encode(answer.body)
    return Response(body, answer.status or status, headers=answer.headers,
                    media_type=answer.media_type)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) as soon as it is over ``limit`` bytes."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise PayloadTooLarge(f"a body of {length} bytes is over this route's limit of "
                              f"{limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the body is over this route's limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_fields(request: Request, route: Route) -> tuple[dict[str, Any], str]:
    """The query string (GET) or JSON body (POST) as a dict, and ``?host=``."""
    query = dict(request.query_params)
    host = query.pop("host", "")
    if host:
        subjects.token(host, "host")
    if route.method == "GET":
        return query, host
    body = await read_body(request, route.max_body)
    if not body.strip():
        return {}, host
    try:
        data = msgspec.json.decode(body)
    except msgspec.DecodeError as e:
        raise InvalidMessage(f"malformed JSON: {e}") from None
    if not isinstance(data, dict):
        raise InvalidMessage(f"the body must be a JSON object, not {type(data).__name__}")
    return data, host


class Dispatch:
    """The ASGI endpoint of one route."""

    def __init__(self, gw: Gateway, route: Route) -> None:
        self.gw, self.route = gw, route

    async def serve(self, request: Request) -> Response:
        started = time.perf_counter()
        route, gw = self.route, self.gw
        remote = request.client.host if request.client else ""
        who: TokenRecord | None = None
        message = ""
        try:
            if route.role is not None:
                who = await gw.auth.identify(request.headers, request.cookies, remote=remote)
                gw.auth.require(who, route.role, f"{route.method} {route.path}")
            fields, host = await read_fields(request, route)
            call = Call(gw, route, dict(request.path_params), fields, host, who,
                        headers=dict(request.headers), remote=remote)
            result = await (route.handler or forward)(call)
            who = call.who
            response = render(result if isinstance(result, Answer) else Answer(result),
                              route.status)
        except PhyError as e:
            message = e.message
            response = error_response(e)
        except Exception:
            log.exception("%s %s failed unexpectedly", route.method, request.url.path)
            message = "unexpected error in the web gateway"
            response = error_response(Internal(f"{message}; see its log"))
        gw.metrics.requests.labels(route=route.path, method=route.method,
                                   status=str(response.status_code)).inc()
        gw.metrics.request_duration.labels(route=route.path).observe(
            time.perf_counter() - started)
        if route.mutating and who is not None:
            await gw.audit(who, route.method, request.url.path, response.status_code, remote,
                           message)
        return response


# -- the app ---------------------------------------------------------------------------------


def build_app(gw: Gateway, registry: CollectorRegistry) -> Starlette:
    async def unmatched(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        gw.metrics.requests.labels(route=UNMATCHED, method=request.method,
                                   status=str(exc.status_code)).inc()
        if exc.status_code == 405:
            err: PhyError = InvalidMessage(f"{request.method} is not allowed on "
                                           f"{request.url.path}")
            response = error_response(err)
            response.status_code = 405
            return response
        return error_response(NotFound(
            f"no route {request.method} {request.url.path}; /api/v1/openapi.json lists them"))

    async def metrics(_request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    async def index(_request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)

    consoles = Consoles(gw)
    routes: list[BaseRoute] = [HttpRoute(r.path, Dispatch(gw, r).serve, methods=[r.method])
                               for r in ROUTES]
    routes += [WebSocketRoute("/api/v1/vms/{vm}/console/vnc", consoles.vnc),
               WebSocketRoute("/api/v1/vms/{vm}/console/serial", consoles.serial)]
    routes += [HttpRoute("/metrics", metrics, methods=["GET"]),
               HttpRoute("/", index, methods=["GET"]),
               Mount("/static", StaticFiles(directory=STATIC))]
    if Path(gw.cfg.novnc_dir).is_dir():  # the VNC console's client, served from this host
        routes.append(Mount("/novnc", StaticFiles(directory=gw.cfg.novnc_dir,
                                                  follow_symlink=True)))
    return Starlette(routes=routes, exception_handlers={404: unmatched, 405: unmatched})


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the gateway's runtime owns SIGTERM and SIGINT (it drains the bus too)


class WebGateway:
    """One running gateway: the bus, the app, the HTTP server."""

    def __init__(self, cfg: WebConfig) -> None:
        self.cfg = cfg
        self.registry = CollectorRegistry()
        self.metrics = WebMetrics(self.registry, host=cfg.host, version=__version__)
        self.stopping = asyncio.Event()
        self.port = 0
        self._bus: Bus | None = None
        self._gw: Gateway | None = None
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def bus(self) -> Bus:
        if self._bus is None:
            raise RuntimeError("web gateway not started")
        return self._bus

    @property
    def url(self) -> str:
        host = self.cfg.listen_host
        host = f"[{host}]" if ":" in host else host
        return f"{self.cfg.scheme}://{host}:{self.port}"

    async def start(self) -> None:
        cfg = self.cfg
        self._bus = await Bus.connect(
            cfg.nats_url, name=f"web@{cfg.host}", host=cfg.host, user=cfg.nats_user,
            password=cfg.nats_password, creds=cfg.nats_creds, ca=cfg.nats_ca)
        try:
            await self._bus.ensure_stream()
            self._gw = Gateway(self._bus, cfg, self.metrics,
                               Auth(self._bus, cfg, self.metrics), stopping=self.stopping)
            family = socket.AF_INET6 if ":" in cfg.listen_host else socket.AF_INET
            sock = socket.create_server((cfg.listen_host, cfg.listen_port), family=family)
        except BaseException:
            await self._bus.close()
            raise
        self.port = sock.getsockname()[1]
        self._server = _Server(uvicorn.Config(
            build_app(self._gw, self.registry), log_config=None, access_log=False,
            lifespan="off", ws=DirectWebSockets, ssl_certfile=cfg.cert or None,
            ssl_keyfile=cfg.key or None, timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
            # console frames are framebuffer updates and keystrokes: deflating them costs
            # more CPU than it saves on a LAN, and VNC's encodings compress already
            ws_per_message_deflate=False, ws_max_size=1 << 20, server_header=False))
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="web-http")
        while not self._server.started:
            if self._task.done():
                sock.close()
                await self._bus.close()
                await self._task
                raise Internal(f"the web gateway's HTTP server did not start on {self.url}")
            await asyncio.sleep(0.01)
        log.info("web gateway of host %s serving on %s", cfg.host, self.url)

    async def close(self) -> None:
        """End the event streams, let requests finish, stop listening, drain the bus."""
        self.stopping.set()
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await self._task
        if self._bus is not None:
            await self._bus.close()
        log.info("web gateway of host %s stopped", self.cfg.host)


async def serve(cfg: WebConfig) -> None:
    """Run the gateway until SIGTERM/SIGINT, then drain."""
    gateway = WebGateway(cfg)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, gateway.stopping.set)
    try:
        await gateway.start()
        await gateway.stopping.wait()
    finally:
        await gateway.close()


def run() -> None:
    try:
        cfg = load()
    except PhyError as e:
        print(f"phyllome-web: {e.message}", file=sys.stderr)
        sys.exit(2)
    setup_logging(cfg.log_level, agent=subjects.WEB, host=cfg.host)
    try:
        run_loop(serve(cfg), uv=True)
    except PhyError as e:
        log.error("cannot run: %s", e.message)
        sys.exit(1)
    except OSError as e:  # the address is taken, or not ours to bind
        log.error("cannot listen on %s:%d: %s (PHYLLOME_WEB_LISTEN)", cfg.listen_host,
                  cfg.listen_port, e.strerror or e)
        sys.exit(1)
