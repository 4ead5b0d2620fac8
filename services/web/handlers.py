"""The routes of the HTTP API ``/api/v1``: what each one answers, who may call it, and how.

Most routes forward to one agent endpoint (``Route.spec``). Their request is that endpoint's
own request type, built from the path parameters and the JSON body (POST) or the query
string (GET), so HTTP and the bus share one contract and the OpenAPI document is generated
from it (``openapi.py``); ``?host=`` names the agent's host (default: the gateway's), and a
VM's routes find its host in KV ``vms``. A job endpoint answers ``202`` with the job's URL.
The other routes read the cluster views of KV (hosts, VMs), place a new VM, gather jobs,
or stream events::

    POST /api/v1/vms/demo/stop  {"timeout_s": 30, "force": true}
      -> vm.shutdown(VmShutdown(vm="demo", timeout_s=30, force=True)) on demo's host
      <- 200 vm.info.v1

Handlers get a ``Call`` (the gateway, the route, the parameters, who called) and return a
message, or an ``Answer`` when the status, headers or a stream are theirs to set.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any, Literal

import msgspec

from services.web import events as event_stream
from services.web.auth import COOKIE, Auth
from services.web.config import WebConfig
from services.web.metrics import WebMetrics
from shared import __version__, subjects
from shared.bus import Bus
from shared.cluster import HostView, cluster_vms, host_views_on
from shared.errors import Conflict, InvalidMessage, NotFound, PhyError, Unauthorized
from shared.messages import Ack, EndpointSpec, new_id
from shared.messages import catalogue as catalogue_api
from shared.messages import hardware as hardware_api
from shared.messages import storage as storage_api
from shared.messages import vm as vm_api
from shared.messages.jobs import JobAccepted, JobRef, JobStatus, job_endpoints
from shared.messages.vm import VmCreate, VmInfo, VmRecord, VmSpec, VmState
from shared.messages.web import Role, TokenRecord, WebAudit
from shared.placement import Recent, choose

Method = Literal["GET", "POST"]
CREATE_TIMEOUT_S = 600.0  # a create from an image clones the image's disk first
JOBS_TIMEOUT_S = 5.0
SSE_MARGIN_S = 2.0  # a new event stream starts this far back


# -- the HTTP API's own messages (the rest are the bus's) ------------------------------------


class VmSummary(msgspec.Struct, frozen=True, kw_only=True, tag="web.vm.v1"):
    """A VM as KV ``vms`` shows it; a VM of a host that is down is ``unknown``."""

    name: str
    uuid: str
    host: str
    state: VmState
    reason: str = ""
    vcpus: int
    memory_mib: int
    accelerator: str
    display: str
    firmware: str
    secure_boot: bool
    tpm: str
    started_at: float = 0.0
    updated: float = 0.0


class VmSummaryList(msgspec.Struct, frozen=True, kw_only=True, tag="web.vm_list.v1"):
    vms: list[VmSummary]


class HostList(msgspec.Struct, frozen=True, kw_only=True, tag="web.host_list.v1"):
    hosts: list[HostView]


class VmCreateBody(msgspec.Struct, frozen=True, kw_only=True, tag="web.vm_create.v1"):
    """A new VM: its spec, an image to clone its first disk from, and where it goes
    (a host's name; empty: the gateway's host; ``auto``: the host that fits best)."""

    spec: VmSpec
    image: str = ""
    host: str = ""


class JobStarted(msgspec.Struct, frozen=True, kw_only=True, tag="web.job_started.v1"):
    """A job an agent took on; ``url`` is where its state is, ``subject`` where its events go."""

    job_id: str
    kind: str
    host: str
    service: str
    subject: str
    url: str


class JobEntry(msgspec.Struct, frozen=True, kw_only=True, tag="web.job_entry.v1"):
    host: str
    service: str
    job: JobStatus


class JobEntries(msgspec.Struct, frozen=True, kw_only=True, tag="web.jobs.v1"):
    jobs: list[JobEntry]
    unreachable: list[str] = []  # "<host>/<service>" that did not answer


class Whoami(msgspec.Struct, frozen=True, kw_only=True, tag="web.whoami.v1"):
    name: str
    role: Role
    host: str  # the gateway's host


class Login(msgspec.Struct, frozen=True, kw_only=True, tag="web.login.v1"):
    token: str


class Health(msgspec.Struct, frozen=True, kw_only=True, tag="web.health.v1"):
    host: str
    version: str
    nats: bool


class HostQuery(msgspec.Struct, frozen=True, kw_only=True):
    host: str = ""  # the host to ask (default: the gateway's)


class EventsQuery(msgspec.Struct, frozen=True, kw_only=True):
    subject: str = subjects.EVENTS_ALL  # a filter over phy.evt.> (* and > allowed)
    since: float | None = None  # seconds back to replay from; default: new events only
    last_event_id: int | None = None  # resume after this event (or the Last-Event-ID header)


# -- plumbing --------------------------------------------------------------------------------


@dataclass
class Gateway:
    """What every handler shares: the bus, the settings, the metrics and the token checks."""

    bus: Bus
    cfg: WebConfig
    metrics: WebMetrics
    auth: Auth
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    # what --host auto placed, until the hosts' heartbeats count it (shared/placement.py)
    recent: Recent = field(default_factory=Recent)

    @property
    def host(self) -> str:
        return self.cfg.host

    async def audit(self, who: TokenRecord, method: str, path: str, status: int, remote: str,
                    message: str = "") -> None:
        """Publish who did what (a mutating call, a console opened) and how it ended."""
        event = WebAudit(host=self.host, token=who.name, role=who.role, method=method,
                         path=path, status=status, remote=remote, message=message)
        if not await self.bus.publish_event(subjects.web_event(self.host, "audit"), event):
            self.metrics.audit_failed.inc()


@dataclass
class Call:
    """One request as a handler sees it."""

    gw: Gateway
    route: Route
    params: dict[str, str]  # path parameters
    fields: dict[str, Any]  # the JSON body (POST) or the query string (GET), host aside
    host: str  # ?host=, or ""
    who: TokenRecord | None
    headers: dict[str, str] = field(default_factory=dict)
    remote: str = ""

    @property
    def idempotency_key(self) -> str | None:
        return self.headers.get("idempotency-key") or None


@dataclass
class Answer:
    """A reply whose status, headers or body a handler chooses itself."""

    body: Any = None
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    stream: AsyncIterator[bytes] | None = None
    media_type: str = "application/json"


Handler = Callable[[Call], Awaitable[Any]]


@dataclass(frozen=True)
class Route:
    """One operation of the API. ``spec`` routes forward to that endpoint; others name their
    ``handler`` and, when they take one, their ``body`` or ``query`` type."""

    method: Method
    path: str
    summary: str
    role: Role | None  # None: no token needed
    response: Any
    handler: Handler | None = None
    spec: EndpointSpec[Any, Any] | None = None
    body: Any = None
    query: Any = None
    status: int = 200
    where: Literal["host", "vm"] = "host"  # a spec route's host: ?host=, or the VM's
    timeout: float = 10.0
    max_body: int = 1 << 20
    stream: bool = False  # answers text/event-stream
    media_type: str = "application/json"  # of the 200 answer (image/png: raw bytes)

    @property
    def path_fields(self) -> list[str]:
        return re.findall(r"{(\w+)}", self.path)

    @property
    def mutating(self) -> bool:
        return self.method != "GET"

    @property
    def request(self) -> Any:
        """The type the parameters and body are decoded as."""
        return self.spec.request if self.spec is not None else (self.body or self.query)

    @property
    def operation_id(self) -> str:
        words = [w.strip("{}") for w in self.path.removeprefix("/api/v1/").split("/")]
        return "_".join([self.method.lower(), *words])


def convert(data: dict[str, Any], tp: Any, *, text: bool = False) -> Any:
    """``data`` as ``tp``; ``text`` when the values came as strings (a query string)."""
    try:
        return msgspec.convert(data, tp, strict=not text)
    except msgspec.ValidationError as e:
        raise InvalidMessage(f"invalid {_tag(tp)}: {e}") from None


def _tag(tp: Any) -> str:
    cfg = getattr(tp, "__struct_config__", None)
    return str(getattr(cfg, "tag", None) or getattr(tp, "__name__", tp))


async def vm_host(bus: Bus, vm: str, host: str = "") -> str:
    """The host of VM ``vm`` (a name or uuid) as KV ``vms`` says, or ``host`` when given."""
    if host:
        return host
    records = [r for r in await cluster_vms(bus) if vm in (r.spec.name, r.spec.uuid)]
    hosts = sorted({r.host for r in records})
    if not hosts:
        raise NotFound(f"no VM named {vm!r} in the cluster; GET /api/v1/vms lists them")
    if len(hosts) > 1:
        raise Conflict(f"VMs named {vm!r} live on {', '.join(hosts)}: add ?host=HOST")
    return hosts[0]


def job_started(host: str, service: str, accepted: JobAccepted) -> Answer:
    url = f"/api/v1/jobs/{host}/{service}/{accepted.job_id}"
    return Answer(JobStarted(job_id=accepted.job_id, kind=accepted.kind, host=host,
                             service=service, subject=accepted.subject, url=url),
                  status=202, headers={"location": url})


# -- handlers --------------------------------------------------------------------------------


async def forward(call: Call) -> Any:
    """A spec route: the endpoint's request from the path and the body or query string."""
    route, spec = call.route, call.route.spec
    assert spec is not None
    req = convert({**call.fields, **call.params}, spec.request, text=route.method == "GET")
    host = await vm_host(call.gw.bus, call.params["vm"], call.host) if route.where == "vm" \
        else (call.host or call.gw.host)
    reply = await call.gw.bus.call(
        host, spec, req, timeout=route.timeout + float(getattr(req, "timeout_s", 0.0)),
        idempotency_key=call.idempotency_key)
    if isinstance(reply, JobAccepted):
        return job_started(host, spec.service, reply)
    return reply


SCREENSHOT_MAX_AGE_S = 2  # how long a browser may show a thumbnail before asking again


async def screenshot(call: Call) -> Answer:
    """A running VM's screen as a PNG from the vm agent of its host; the ETag is the image's
    digest, so a browser that has it gets ``304``."""
    req = convert({**call.fields, **call.params}, vm_api.VmScreenshotRequest, text=True)
    host = await vm_host(call.gw.bus, req.vm, call.host)
    shot: vm_api.VmScreenshot = await call.gw.bus.call(host, vm_api.SCREENSHOT, req,
                                                       timeout=call.route.timeout)
    etag = '"' + hashlib.blake2b(shot.png, digest_size=12).hexdigest() + '"'
    headers = {"cache-control": f"private, max-age={SCREENSHOT_MAX_AGE_S}", "etag": etag,
               "last-modified": formatdate(shot.taken, usegmt=True),
               "x-screen-size": f"{shot.screen_width}x{shot.screen_height}"}
    known = {t.strip().removeprefix("W/") for t in call.headers.get("if-none-match", "").split(",")}
    if etag in known or "*" in known:
        return Answer(b"", status=304, headers=headers, media_type="image/png")
    return Answer(shot.png, headers=headers, media_type="image/png")


async def list_hosts(call: Call) -> HostList:
    return HostList(hosts=await host_views_on(call.gw.bus))


def summary(r: VmRecord) -> VmSummary:
    s = r.spec
    return VmSummary(name=s.name, uuid=s.uuid, host=r.host, state=r.state, reason=r.reason,
                     vcpus=s.vcpus, memory_mib=s.memory_mib, accelerator=r.accelerator,
                     display=s.display, firmware=s.firmware, secure_boot=s.secure_boot,
                     tpm=s.tpm, started_at=r.started_at, updated=r.updated)


async def list_vms(call: Call) -> VmSummaryList:
    records = await cluster_vms(call.gw.bus)
    if call.host:
        records = [r for r in records if r.host == call.host]
    return VmSummaryList(vms=[summary(r) for r in records])


async def create_vm(call: Call) -> Answer:
    body: VmCreateBody = convert(call.fields, VmCreateBody)
    host = body.host or call.host or call.gw.host
    if host == "auto":
        host = (await choose(call.gw.bus, body.spec, recent=call.gw.recent)).host
    info: VmInfo = await call.gw.bus.call(
        host, vm_api.CREATE, VmCreate(spec=body.spec, image=body.image),
        timeout=CREATE_TIMEOUT_S if body.image else 30.0,
        idempotency_key=call.idempotency_key or new_id())
    return Answer(info, status=201, headers={"location": f"/api/v1/vms/{info.name}"})


async def list_jobs(call: Call) -> JobEntries:
    """The jobs of every agent of one host (``?host=``) or of every host that is up."""
    if call.host:
        pairs = [(call.host, svc) for svc in subjects.SERVICES]
    else:
        pairs = [(v.host, a) for v in await host_views_on(call.gw.bus) if v.state == "up"
                 for a in v.agents if a in subjects.SERVICES]

    async def one(host: str, svc: str) -> list[JobEntry]:
        jobs, _job, _cancel = job_endpoints(svc)
        listed = await call.gw.bus.call(host, jobs, jobs.request(), timeout=JOBS_TIMEOUT_S)
        return [JobEntry(host=host, service=svc, job=j) for j in listed.jobs]

    results = await asyncio.gather(*(one(h, s) for h, s in pairs), return_exceptions=True)
    entries: list[JobEntry] = []
    unreachable: list[str] = []
    for (host, svc), result in zip(pairs, results, strict=True):
        if isinstance(result, PhyError):
            unreachable.append(f"{host}/{svc}")
        elif isinstance(result, BaseException):
            raise result
        else:
            entries += result
    entries.sort(key=lambda e: e.job.started, reverse=True)
    return JobEntries(jobs=entries, unreachable=unreachable)


def _job_spec(call: Call, index: int) -> EndpointSpec[JobRef, JobStatus]:
    return job_endpoints(subjects.service(call.params["service"]))[index]  # type: ignore[return-value]


async def get_job(call: Call) -> JobStatus:
    host = subjects.token(call.params["host"], "host")
    return await call.gw.bus.call(host, _job_spec(call, 1), JobRef(job_id=call.params["job_id"]))


async def cancel_job(call: Call) -> JobStatus:
    host = subjects.token(call.params["host"], "host")
    return await call.gw.bus.call(host, _job_spec(call, 2), JobRef(job_id=call.params["job_id"]))


async def whoami(call: Call) -> Whoami:
    assert call.who is not None
    return Whoami(name=call.who.name, role=call.who.role, host=call.gw.host)


async def health(call: Call) -> Health:
    return Health(host=call.gw.host, version=__version__, nats=call.gw.bus.nc.is_connected)


def cookie(value: str, *, secure: bool, max_age: int | None = None) -> str:
    """The login cookie: script cannot read it, no other site's page sends it."""
    parts = [f"{COOKIE}={value}", "Path=/", "HttpOnly", "SameSite=Strict"]
    if max_age is not None:
        parts.append(f"Max-Age={max_age}")
    if secure:
        parts.append("Secure")
    return "; ".join(parts)


async def login(call: Call) -> Answer:
    body: Login = convert(call.fields, Login)
    if not body.token:
        raise Unauthorized("no token given; `phyllome web token create NAME --role viewer` "
                           "makes one")
    who = await call.gw.auth.login(body.token, call.remote)
    call.who = who
    return Answer(Whoami(name=who.name, role=who.role, host=call.gw.host), headers={
        "set-cookie": cookie(body.token, secure=call.gw.cfg.scheme == "https")})


async def logout(call: Call) -> Answer:
    return Answer(Ack(message="logged out"), headers={
        "set-cookie": cookie("", secure=call.gw.cfg.scheme == "https", max_age=0)})


async def stream_events(call: Call) -> Answer:
    query: EventsQuery = convert(call.fields, EventsQuery, text=True)
    header = call.headers.get("last-event-id", "")
    after = query.last_event_id
    if header:
        if not header.isdigit():
            raise InvalidMessage(f"Last-Event-ID {header!r}: the id of an event this stream "
                                 "sent (a number)")
        after = int(header)
    since = time.time() - query.since if query.since is not None else None
    if after is None and since is None:
        # From now on, as the stream's clock may see it: a replayed second or two is harmless
        # (states arrive in order), a missed event is not.
        since = time.time() - SSE_MARGIN_S
    subject = event_stream.check_filter(query.subject)
    return Answer(stream=await event_stream.sse(call.gw.bus, subject, since=since, after=after,
                                                stopping=call.gw.stopping,
                                                open_streams=call.gw.metrics.event_streams),
                  media_type="text/event-stream",
                  headers={"cache-control": "no-cache", "x-accel-buffering": "no"})


async def openapi(call: Call) -> Any:
    from services.web.openapi import document

    return document()


# -- the table -------------------------------------------------------------------------------

V = "/api/v1"


def _vm_action(verb: str, spec: EndpointSpec[Any, Any], summary: str, *,
               role: Role = "operator", status: int = 200, timeout: float = 30.0) -> Route:
    response = JobStarted if status == 202 else spec.response
    return Route("POST", f"{V}/vms/{{vm}}/{verb}", summary, role, response, spec=spec,
                 where="vm", status=status, timeout=timeout)


ROUTES: tuple[Route, ...] = (
    Route("GET", f"{V}/health", "The gateway answers; whether it reaches NATS.", None, Health,
          health),
    Route("GET", f"{V}/openapi.json", "This API as an OpenAPI 3.1 document.", None, dict,
          openapi),
    Route("POST", f"{V}/login", "Check a token and keep it in an HttpOnly, SameSite=Strict "
          "cookie for the UI.", None, Whoami, login, body=Login, max_body=4096),
    Route("POST", f"{V}/logout", "Forget the login cookie.", None, Ack, logout, max_body=4096),
    Route("GET", f"{V}/whoami", "The caller's token name and role.", "viewer", Whoami, whoami),
    Route("GET", f"{V}/hosts", "Every host of the cluster: up or down, agents, room.",
          "viewer", HostList, list_hosts),
    # VMs
    Route("GET", f"{V}/vms", "Every VM of the cluster (from KV vms; a down host's are "
          "unknown).", "viewer", VmSummaryList, list_vms, query=HostQuery),
    Route("POST", f"{V}/vms", "Create a VM (defined, stopped); host `auto` places it. "
          "Honours Idempotency-Key.", "operator", VmInfo, create_vm, body=VmCreateBody,
          status=201),
    Route("GET", f"{V}/vms/{{vm}}", "A VM as its host sees it now (vm info --json).",
          "viewer", VmInfo, spec=vm_api.INFO, where="vm"),
    Route("GET", f"{V}/vms/{{vm}}/screenshot", "A running VM's screen as a PNG no wider "
          "than max_width (libvirt's screenshot; ETag, 304).", "operator", bytes, screenshot,
          spec=vm_api.SCREENSHOT, where="vm", media_type="image/png"),
    _vm_action("start", vm_api.START, "Start a VM."),
    _vm_action("stop", vm_api.SHUTDOWN, "ACPI shutdown; with timeout_s and force, power off "
               "after the wait."),
    _vm_action("destroy", vm_api.DESTROY, "Power off at once."),
    _vm_action("reboot", vm_api.REBOOT, "ACPI reboot."),
    _vm_action("suspend", vm_api.SUSPEND, "Pause the vCPUs."),
    _vm_action("resume", vm_api.RESUME, "Continue a paused VM."),
    _vm_action("delete", vm_api.DELETE, "Undefine a VM with its NVRAM and TPM state "
               "(delete_disks: the disks made for it)."),
    _vm_action("update", vm_api.UPDATE, "Change a stopped VM."),
    _vm_action("clone", vm_api.CLONE, "Copy a stopped VM (a job).", status=202),
    _vm_action("migrate", vm_api.MIGRATE, "Move a stopped VM to another host (a job).",
               status=202),
    # storage
    Route("GET", f"{V}/pools", "A host's storage pools.", "viewer", storage_api.PoolList,
          spec=storage_api.POOLS),
    Route("GET", f"{V}/volumes", "A host's volumes, of one pool or all.", "viewer",
          storage_api.VolumeList, spec=storage_api.VOLUMES),
    # images
    Route("GET", f"{V}/images", "The catalogue, filtered.", "viewer", catalogue_api.ImageList,
          spec=catalogue_api.LIST),
    Route("GET", f"{V}/images/{{id}}", "One catalogue entry, its VM template, its local copy.",
          "viewer", catalogue_api.ImageInfo, spec=catalogue_api.INFO),
    Route("POST", f"{V}/images/{{id}}/pull", "Download, verify and convert an image (a job).",
          "operator", JobStarted, spec=catalogue_api.PULL, status=202),
    # hardware
    Route("GET", f"{V}/hw/devices", "A host's PCI devices with passthrough readiness.",
          "viewer", hardware_api.DeviceList, spec=hardware_api.LIST),
    Route("GET", f"{V}/hw/devices/{{address}}", "One PCI device.", "viewer",
          hardware_api.PciDevice, spec=hardware_api.DEVICE),
    Route("GET", f"{V}/hw/report", "A host's full readiness report.", "viewer",
          hardware_api.HwReport, spec=hardware_api.REPORT),
    Route("POST", f"{V}/hw/devices/{{address}}/bind", "Bind a device and its IOMMU group to "
          "vfio-pci (a job).", "admin", JobStarted, spec=hardware_api.BIND, status=202),
    Route("POST", f"{V}/hw/devices/{{address}}/release", "Give a bound group back to its "
          "drivers (a job).", "admin", JobStarted, spec=hardware_api.RELEASE, status=202),
    # jobs and events
    Route("GET", f"{V}/jobs", "Jobs of every agent of a host, or of every host.", "viewer",
          JobEntries, list_jobs, query=HostQuery),
    Route("GET", f"{V}/jobs/{{host}}/{{service}}/{{job_id}}", "One job's state and progress.",
          "viewer", JobStatus, get_job),
    Route("POST", f"{V}/jobs/{{host}}/{{service}}/{{job_id}}/cancel", "Cancel a job; it rolls "
          "back.", "operator", JobStatus, cancel_job, max_body=4096),
    Route("GET", f"{V}/events", "Server-Sent Events from PHY_EVENTS: a subject filter, replay "
          "from Last-Event-ID or `since` seconds back.", "viewer", str, stream_events,
          query=EventsQuery, stream=True),
)
