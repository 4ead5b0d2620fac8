"""The web gateway's HTTP API over real HTTP: uvicorn on a free port, a real nats-server, the
real vm agent on libvirt's test driver, httpx as the client."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from services.web.handlers import ROUTES
from services.web.service import WebGateway
from shared import subjects
from shared.agent import Agent
from shared.messages.web import WebAudit
from shared.natsserver import NatsServer
from tests.support import png
from tests.support.agents import REPO, agent_in_process
from tests.support.wait import until
from tests.support.web import bearer, gateway_in_process, make_token

pytestmark = pytest.mark.integration

HOST = "h1"


@contextlib.asynccontextmanager
async def stack(nats: NatsServer, state: Path, uri: str, **web: Any,
                ) -> AsyncIterator[tuple[Agent, WebGateway, httpx.AsyncClient]]:
    """h1's vm agent (libvirt test driver), its gateway, and an HTTP client of it."""
    async with agent_in_process(
        "vm", nats.url, state, host=HOST, libvirt_uri=uri, accelerator="tcg",
        extra={"reconcile_s": 3600, "disk_dir": str(state / "disks")},
    ) as agent, gateway_in_process(nats.url, HOST, **web) as gw, httpx.AsyncClient(
            base_url=gw.url, timeout=30) as http:
        yield agent, gw, http


def raw_disk(path: Path, size: int = 1 << 20) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


def spec(name: str, disk: str) -> dict[str, Any]:
    return {"name": name, "memory_mib": 64, "disks": [{"path": disk}]}


def error(r: httpx.Response, status: int, kind: str) -> str:
    """The message of an ``error.v1`` reply of ``status`` and ``kind``."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert (body["type"], body["kind"]) == ("error.v1", kind), body
    return str(body["message"])


async def audits(gw: WebGateway) -> list[WebAudit]:
    found = []
    async for _s, _t, data in gw.bus.events(subjects.web_event(HOST, "audit")):
        found.append(msgspec.json.decode(data, type=WebAudit))
    return found


async def test_vm_lifecycle_over_http(nats_server: NatsServer, tmp_path: Path,
                                      libvirt_test_uri: str) -> None:
    async with stack(nats_server, tmp_path, libvirt_test_uri) as (_agent, gw, http):
        op = bearer(await make_token(gw.bus, "alice", "operator"))
        disk = raw_disk(tmp_path / "web-1.raw")
        r = await http.post("/api/v1/vms", headers=op, json={"spec": spec("web-1", disk)})
        assert r.status_code == 201, r.text
        assert r.headers["location"] == "/api/v1/vms/web-1"
        created = r.json()
        assert (created["type"], created["state"], created["host"]) == (
            "vm.info.v1", "shutoff", HOST)

        r = await http.get("/api/v1/vms", headers=op)
        assert [(v["name"], v["host"], v["state"], v["uuid"]) for v in r.json()["vms"]] == [
            ("web-1", HOST, "shutoff", created["uuid"])]
        r = await http.get(f"/api/v1/vms/{created['uuid']}", headers=op)
        assert r.json()["name"] == "web-1" and r.json()["spec"]["memory_mib"] == 64

        r = await http.post("/api/v1/vms/web-1/start", headers=op)
        assert (r.status_code, r.json()["state"]) == (200, "running")
        assert "already" in error(await http.post("/api/v1/vms/web-1/start", headers=op),
                                  409, "conflict")
        assert "clone needs a stopped VM" in error(await http.post(
            "/api/v1/vms/web-1/clone", headers=op, json={"name": "copy"}), 409, "conflict")
        r = await http.post("/api/v1/vms/web-1/destroy", headers=op)
        assert r.json()["state"] == "shutoff"

        r = await http.post("/api/v1/vms/web-1/clone", headers=op, json={"name": "web-2"})
        assert r.status_code == 202, r.text
        job = r.json()
        assert job["type"] == "web.job_started.v1" and r.headers["location"] == job["url"]
        assert job["url"] == f"/api/v1/jobs/{HOST}/vm/{job['job_id']}"

        async def finished() -> dict[str, Any] | None:
            status = (await http.get(job["url"], headers=op)).json()
            return status if status["state"] != "running" else None

        status = await until("the clone job to finish", finished, timeout=30)
        assert status["state"] == "succeeded", status
        listed = (await http.get("/api/v1/jobs", headers=op, params={"host": HOST})).json()
        assert [(j["host"], j["service"], j["job"]["job_id"]) for j in listed["jobs"]] == [
            (HOST, "vm", job["job_id"])]
        assert f"{HOST}/storage" in listed["unreachable"]  # no storage agent runs here

        r = await http.post("/api/v1/vms/web-2/delete", headers=op,
                            json={"delete_disks": True})
        assert (r.status_code, r.json()["type"]) == (200, "ack.v1")
        assert "no VM named 'web-2'" in error(
            await http.get("/api/v1/vms/web-2", headers=op), 404, "not_found")

        trail = [(a.token, a.role, a.method, a.path, a.status) for a in await audits(gw)]
        assert trail == [
            ("alice", "operator", "POST", "/api/v1/vms", 201),
            ("alice", "operator", "POST", "/api/v1/vms/web-1/start", 200),
            ("alice", "operator", "POST", "/api/v1/vms/web-1/start", 409),
            ("alice", "operator", "POST", "/api/v1/vms/web-1/clone", 409),
            ("alice", "operator", "POST", "/api/v1/vms/web-1/destroy", 200),
            ("alice", "operator", "POST", "/api/v1/vms/web-1/clone", 202),
            ("alice", "operator", "POST", "/api/v1/vms/web-2/delete", 200)]


async def test_a_running_vms_screenshot_is_a_png_with_cache_headers(
        nats_server: NatsServer, tmp_path: Path, libvirt_test_uri: str) -> None:
    """The test driver's screen (libvirt's picture) through vm.screenshot, shrunk."""
    async with stack(nats_server, tmp_path, libvirt_test_uri) as (_agent, gw, http):
        op = bearer(await make_token(gw.bus, "op", "operator"))
        viewer = bearer(await make_token(gw.bus, "eve", "viewer"))
        r = await http.post("/api/v1/vms", headers=op,
                            json={"spec": spec("shot", raw_disk(tmp_path / "s.raw"))})
        assert r.status_code == 201, r.text
        url = "/api/v1/vms/shot/screenshot"
        assert "is shutoff: start it" in error(await http.get(url, headers=op), 409, "conflict")
        assert "no VM named 'ghost'" in error(
            await http.get("/api/v1/vms/ghost/screenshot", headers=op), 404, "not_found")
        await http.post("/api/v1/vms/shot/start", headers=op)

        r = await http.get(url, headers=op, params={"max_width": 200})
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "image/png"
        assert r.headers["cache-control"] == "private, max-age=2"
        assert r.headers["x-screen-size"] == "1120x832"
        width, height, _bpp, _rows = png.decode(r.content)
        assert width <= 200 and height > 0
        assert png.distinct_pixels(r.content) > 1
        again = await http.get(url, headers={**op, "if-none-match": f'"x", W/{r.headers["etag"]}'},
                               params={"max_width": 200})
        assert (again.status_code, again.content) == (304, b"")
        assert again.headers["etag"] == r.headers["etag"]

        for bad, says in (("8", "16 to 1920 pixels"), ("5000", "16 to 1920 pixels"),
                          ("wide", "Expected `int`")):
            r = await http.get(url, headers=op, params={"max_width": bad})
            assert says in error(r, 400, "invalid_message"), bad
        assert "needs operator" in error(await http.get(url, headers=viewer), 403, "forbidden")
        error(await http.get(url), 401, "unauthorized")


async def test_tokens_roles_and_the_login_cookie(nats_server: NatsServer, tmp_path: Path,
                                                 libvirt_test_uri: str) -> None:
    async with stack(nats_server, tmp_path, libvirt_test_uri, token_cache_s=0.0) as (
            _agent, gw, http):
        viewer = await make_token(gw.bus, "ci", "viewer")
        op = await make_token(gw.bus, "bob", "operator")
        await http.post("/api/v1/vms", headers=bearer(op),
                        json={"spec": spec("demo", raw_disk(tmp_path / "d.raw"))})

        r = await http.get("/api/v1/vms")
        assert "no token" in error(r, 401, "unauthorized")
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert "unknown or revoked" in error(
            await http.get("/api/v1/vms", headers=bearer("phy_" + "x" * 43)), 401,
            "unauthorized")
        assert (await http.get("/api/v1/vms", headers=bearer(viewer))).status_code == 200
        r = await http.post("/api/v1/vms/demo/start", headers=bearer(viewer))
        assert error(r, 403, "forbidden") == (
            "token 'ci' is a viewer; POST /api/v1/vms/{vm}/start needs operator")
        r = await http.post("/api/v1/hw/devices/0000:00:02.0/bind", headers=bearer(op))
        assert "needs admin" in error(r, 403, "forbidden")
        assert (await http.get("/api/v1/vms/demo", headers=bearer(viewer))).json()[
            "state"] == "shutoff"

        r = await http.post("/api/v1/login", json={"token": op})
        assert r.json() == {"type": "web.whoami.v1", "name": "bob", "role": "operator",
                            "host": HOST}
        flags = {f.strip().split("=")[0] for f in r.headers["set-cookie"].split(";")}
        assert {"phyllome_token", "HttpOnly", "SameSite", "Path"} <= flags
        assert "SameSite=Strict" in r.headers["set-cookie"]
        assert (await http.get("/api/v1/whoami")).json()["name"] == "bob"  # the cookie
        r = await http.post("/api/v1/vms/demo/start")
        assert (r.status_code, r.json()["state"]) == (200, "running")
        await http.post("/api/v1/logout")
        assert (await http.get("/api/v1/whoami")).status_code == 401

        def cli(*argv: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "cli.main", "web", "token", *argv,
                                   "--nats", nats_server.url], cwd=REPO, capture_output=True,
                                  text=True, timeout=60)

        listed = json.loads(cli("list", "--json").stdout)["tokens"]
        assert sorted((t["name"], t["role"]) for t in listed) == [
            ("bob", "operator"), ("ci", "viewer")]
        assert not any(viewer in json.dumps(t) or op in json.dumps(t) for t in listed)
        done = cli("revoke", "ci")
        assert done.returncode == 0 and "token 'ci' (viewer) revoked" in done.stdout, done
        assert "no token named 'ci'" in cli("revoke", "ci").stderr
        assert "token name 'a b': use 1-64 letters" in cli("create", "a b").stderr
        assert "a token named 'bob' exists" in cli("create", "bob").stderr
        error(await http.get("/api/v1/vms", headers=bearer(viewer)), 401, "unauthorized")
        refused = [a for a in await audits(gw) if a.status == 403]
        assert [(a.token, a.path) for a in refused] == [
            ("ci", "/api/v1/vms/demo/start"), ("bob", "/api/v1/hw/devices/0000:00:02.0/bind")]


async def test_bad_tokens_make_their_address_wait(nats_server: NatsServer, tmp_path: Path,
                                                  libvirt_test_uri: str) -> None:
    async with stack(nats_server, tmp_path, libvirt_test_uri, backoff_free=2,
                     backoff_base_s=0.5) as (_agent, gw, http):
        good = bearer(await make_token(gw.bus, "ok", "viewer"))
        bad = bearer("phy_guess")
        for _ in range(3):  # two free guesses, then a third that earns the first wait
            error(await http.get("/api/v1/hosts", headers=bad), 401, "unauthorized")
        r = await http.get("/api/v1/hosts", headers=good)
        assert "too many bad tokens from 127.0.0.1" in error(r, 429, "too_many_requests")
        assert r.headers["retry-after"] == "1"
        r = await until("the wait to end", lambda: _get(http, "/api/v1/hosts", good), 10)
        assert r.json()["hosts"][0]["host"] == HOST
        # the good token cleared the address: two free guesses again
        for _ in range(2):
            error(await http.get("/api/v1/hosts", headers=bad), 401, "unauthorized")
        text = (await http.get("/metrics")).text
        assert 'phyllome_web_auth_failures_total{reason="unknown"} 5.0' in text


async def _get(http: httpx.AsyncClient, path: str, headers: dict[str, str],
               ) -> httpx.Response | None:
    r = await http.get(path, headers=headers)
    return r if r.status_code == 200 else None


async def test_bad_input_on_every_route_gets_a_typed_error(
        nats_server: NatsServer, tmp_path: Path, libvirt_test_uri: str) -> None:
    async with stack(nats_server, tmp_path, libvirt_test_uri) as (_agent, gw, http):
        admin = bearer(await make_token(gw.bus, "root", "admin"))
        await http.post("/api/v1/vms", headers=admin,
                        json={"spec": spec("demo", raw_disk(tmp_path / "d.raw"))})
        wrong: list[str] = []

        def path_of(template: str) -> str:
            return (template.replace("{vm}", "demo").replace("{id}", "tiny")
                    .replace("{address}", "0000:00:02.0").replace("{host}", HOST)
                    .replace("{service}", "vm").replace("{job_id}", "nope"))

        def expect(r: httpx.Response, status: int, kind: str, what: str) -> None:
            try:
                error(r, status, kind)
            except AssertionError as e:
                wrong.append(f"{what}: {e}")

        for route in ROUTES:
            path = path_of(route.path)
            what = f"{route.method} {route.path}"
            if route.role is not None:
                expect(await http.request(route.method, path), 401, "unauthorized",
                       f"{what} without a token")
                expect(await http.request(route.method, path, headers=bearer("nonsense")),
                       401, "unauthorized", f"{what} with a bad token")
            expect(await http.request(route.method, path, headers=admin,
                                      params={"host": "a.b"}), 400, "invalid_name",
                   f"{what} ?host=a.b")
            if route.method == "POST":
                for body, kind in ((b"{not json", "invalid_message"),
                                   (b"[1, 2]", "invalid_message")):
                    expect(await http.post(path, headers=admin, content=body), 400, kind,
                           f"{what} {body!r}")
                expect(await http.post(path, headers=admin,
                                       content=b'{"x": "' + b"a" * (route.max_body) + b'"}'),
                       413, "payload_too_large", f"{what} oversize")
        assert wrong == []

        # wrong types, per kind of route
        cases = [
            ("POST", "/api/v1/vms", {"spec": {"name": "x", "vcpus": "two"}},
             "Expected `int`, got `str` - at `$.spec.vcpus`"),
            ("POST", "/api/v1/vms", {"image": "tiny"}, "Object missing required field `spec`"),
            ("POST", "/api/v1/vms/demo/stop", {"timeout_s": "soon"},
             "Expected `float`, got `str` - at `$.timeout_s`"),
            ("POST", "/api/v1/vms/demo/clone", {}, "missing required field `name`"),
            ("POST", "/api/v1/vms/demo/migrate", {"to": 5}, "Expected `str`, got `int`"),
            ("POST", "/api/v1/login", {"token": ["a"]}, "Expected `str`, got `array`"),
            ("GET", "/api/v1/events?since=yesterday", None, "Expected `float | null`"),
            ("GET", "/api/v1/hw/devices?kind=toaster", None, "Invalid enum value 'toaster'"),
        ]
        for method, path, body, message in cases:
            r = await http.request(method, path, headers=admin, json=body)
            assert message in error(r, 400, "invalid_message"), (method, path)
        r = await http.get("/api/v1/events", headers={**admin, "last-event-id": "x"})
        assert "Last-Event-ID 'x'" in error(r, 400, "invalid_message")
        r = await http.get("/api/v1/events?subject=foo.>", headers=admin)
        assert "use phy.evt.>" in error(r, 400, "invalid_name")
        r = await http.get("/api/v1/jobs/h1/nosuch/1", headers=admin)
        assert "unknown service 'nosuch'" in error(r, 400, "invalid_name")
        r = await http.get("/api/v1/nothing-here", headers=admin)
        assert "no route GET /api/v1/nothing-here" in error(r, 404, "not_found")
        error(await http.delete("/api/v1/vms", headers=admin), 405, "invalid_message")
        r = await http.get("/api/v1/pools", headers=admin)
        assert "no storage agent for host 'h1' answers" in error(r, 503, "unavailable")
        text = (await http.get("/metrics")).text
        assert ('phyllome_web_http_requests_total{method="GET",route="/api/v1/pools",'
                'status="503"} 1.0') in text
        assert 'route="unmatched",status="404"' in text


async def test_events_stream_replays_from_last_event_id(
        nats_server: NatsServer, tmp_path: Path, libvirt_test_uri: str) -> None:
    async with stack(nats_server, tmp_path, libvirt_test_uri) as (_agent, gw, http):
        op = bearer(await make_token(gw.bus, "op", "operator"))
        filt = {"subject": f"phy.evt.{HOST}.vm.state.*"}
        seen: list[dict[str, Any]] = []
        async with http.stream("GET", "/api/v1/events", headers=op, params=filt) as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            lines = stream.aiter_lines()
            await http.post("/api/v1/vms", headers=op,
                            json={"spec": spec("ev", raw_disk(tmp_path / "e.raw"))})
            await http.post("/api/v1/vms/ev/start", headers=op)
            while len(seen) < 2:
                line = await anext(lines)
                if line.startswith("data: "):
                    seen.append(json.loads(line[6:]))
        assert [(e["event"]["type"], e["event"]["event"]) for e in seen] == [
            ("vm.state_changed.v1", "defined"), ("vm.state_changed.v1", "started")]
        await http.post("/api/v1/vms/ev/destroy", headers=op)
        # resume after the first event: the second and the one sent while away come back
        resumed: list[dict[str, Any]] = []
        async with http.stream("GET", "/api/v1/events", params=filt, headers={
                **op, "last-event-id": str(seen[0]["seq"])}) as stream:
            ids = []
            async for line in stream.aiter_lines():
                if line.startswith("id: "):
                    ids.append(int(line[4:]))
                if line.startswith("data: "):
                    resumed.append(json.loads(line[6:]))
                    if len(resumed) == 2:
                        break
        assert [e["event"]["event"] for e in resumed] == ["started", "stopped"]
        assert ids == [e["seq"] for e in resumed] and ids[0] == seen[1]["seq"]


async def test_the_served_openapi_document_is_the_generated_one(
        nats_server: NatsServer, tmp_path: Path, libvirt_test_uri: str) -> None:
    async with stack(nats_server, tmp_path, libvirt_test_uri) as (_agent, _gw, http):
        served = (await http.get("/api/v1/openapi.json")).json()
        assert served == json.loads((REPO / "docs" / "openapi.json").read_text())
        r = await http.get("/api/v1/health")
        assert r.json()["nats"] is True and r.json()["host"] == HOST
        page = await http.get("/")
        assert page.status_code == 200 and "<title>Phyllome</title>" in page.text
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert (await http.get("/static/app.js")).headers["content-type"].startswith(
            "text/javascript")
