"""The bus: NATS connection, request/reply through micro endpoints, JetStream events and KV.

    bus = await Bus.connect("nats://127.0.0.1:4222", name="cli", host="h1")
    info = await bus.call("h1", vm_api.INFO, VmRef(vm="demo"), timeout=5)   # -> VmInfo
    await bus.publish_event("phy.evt.h1.vm.state.abc", VmStateChanged(...))
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import ssl
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar, cast
from urllib.parse import urlsplit

import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType, StreamConfig
from nats.js.kv import KeyValue

from shared import subjects, wire
from shared.codec import decode, encode
from shared.errors import (
    Cancelled,
    Conflict,
    Internal,
    NotAuthorized,
    PhyError,
    Timeout,
    Unavailable,
    to_reply,
)
from shared.messages import EndpointSpec, Event
from shared.wire import ELECTING as ELECTING  # services.vm.state names it
from shared.wire import IDEMPOTENCY_HEADER

if TYPE_CHECKING:  # a CLI process needs neither: imported by the agents that serve
    from nats.micro.request import Request
    from nats.micro.service import Service

    from shared.metrics import AgentMetrics

log = logging.getLogger("phyllome.bus")

IDEMPOTENCY_TTL_S = 24 * 3600.0  # how long a keyed reply is kept (in KV and in memory)
IDEMPOTENCY_MEMORY = 10_000  # keyed replies kept in memory in front of KV
EVENT_MAX_AGE_S = 30 * 24 * 3600
DUPLICATE_WINDOW_S = 120.0
# KV buckets and their settings; ``hosts`` TTL comes from the agents' heartbeat TTL.
Handler = Callable[[Any], Awaitable[Any]]
Req = TypeVar("Req")
Resp = TypeVar("Resp")
Reply = tuple[dict[str, str] | None, bytes]
KV_HISTORY = {subjects.KV_HOSTS: 1, subjects.KV_VMS: 5, subjects.KV_IMAGES: 5}
# Outcomes of a keyed request that are not kept: nothing was done, so a retry must act.
NOT_KEPT = frozenset({Cancelled.kind, Unavailable.kind, Timeout.kind})
# What nats-py hands the error callback (lower-cased) when the server refuses a publish.
_PUBLISH_REFUSED = re.compile(r'permissions violation for publish to "([^"]+)"')


class _QuietTlsEof(logging.Filter):
    """asyncio warns "returning true from eof_received() has no effect when using ssl" each
    time a TLS server closes a nats-py connection (its protocol keeps the transport open on
    EOF, which TLS cannot): noise on every command of a secure cluster, not a fault."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "eof_received()" not in record.getMessage()


logging.getLogger("asyncio").addFilter(_QuietTlsEof())


class StreamEvent(NamedTuple):
    """An event as ``Bus.stream`` reads it from PHY_EVENTS."""

    subject: str
    time: float
    data: bytes
    seq: int  # its sequence in the stream: where a reader resumes


class KeptReply(msgspec.Struct, frozen=True, kw_only=True, tag="bus.kept_reply.v1"):
    """The reply to a keyed request, in KV ``idempotency`` under
    ``<host>.<service>.<verb>.<sha256 of the key>`` for ``IDEMPOTENCY_TTL_S``."""

    request_sha256: str
    headers: dict[str, str] | None = None
    body: bytes = b""


@dataclass(eq=False)
class _Waiting:
    """A request in flight, ended by ``Bus._refused`` when the server refuses its publish."""

    task: asyncio.Task[Any] | None
    refused: bool = False


@dataclass
class _Slot:
    """A keyed request in memory: the body it came with, and its reply once settled."""

    request_sha256: str
    reply: asyncio.Future[Reply]
    at: float


class Bus:
    """One NATS connection with JetStream, shared by an agent's handlers or by the CLI."""

    def __init__(self, nc: Client, *, host: str, metrics: AgentMetrics | None = None,
                 replicas: int = 1, kv_ttl_s: float = 20.0, identity: str = "") -> None:
        self.nc = nc
        self.identity = identity or "anonymous"  # the NATS user, named in refusals
        self.js: JetStreamContext = nc.jetstream(timeout=10.0)
        self.host = host
        self.metrics = metrics
        self.replicas = replicas
        self.kv_ttl_s = kv_ttl_s
        self._kv: dict[str, KeyValue] = {}
        self._inflight: set[asyncio.Task[None]] = set()
        self._idempotent: OrderedDict[str, _Slot] = OrderedDict()
        self._services: list[Service] = []
        self._read_locks: dict[str, asyncio.Lock] = {}
        self._reads_begun: dict[str, int] = {}
        self._last_reads: dict[str, tuple[int, list[tuple[str, int, bytes]]]] = {}
        # Requests in flight by subject (lower-cased, as the server's refusal names it).
        self._waiting: dict[str, list[_Waiting]] = {}

    # -- connection -------------------------------------------------------------------------

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        name: str,
        host: str,
        metrics: AgentMetrics | None = None,
        give_up_after: float | None = None,
        user: str = "",
        password: str = "",
        creds: str = "",
        ca: str = "",
        replicas: int = 1,
        kv_ttl_s: float = 20.0,
    ) -> Bus:
        """Connect, retrying with backoff while the server is down (forever by default)."""
        opts: dict[str, Any] = {}
        if user:
            opts.update(user=user, password=password)
        if creds:
            opts["user_credentials"] = creds
        if ca:
            opts["tls"] = ssl.create_default_context(cafile=ca)
        identity = wire.identity_of(user, creds)

        closing: list[Client] = []
        buses: list[Bus] = []
        # Set when the server turns this client away while it connects: nats-py would retry
        # (and the caller wait) until the deadline, for an answer that will not change.
        refused: asyncio.Future[Exception] = asyncio.get_running_loop().create_future()

        async def disconnected() -> None:
            if metrics:
                metrics.bus_connected.set(0)
            if not any(c.is_closed or c.is_draining for c in closing):
                log.warning("disconnected from NATS at %s; reconnecting", url)

        async def reconnected() -> None:
            if metrics:
                metrics.bus_connected.set(1)
                metrics.bus_reconnects.inc()
            log.info("reconnected to NATS at %s", url)

        async def error(e: Exception) -> None:
            if not closing and not refused.done() and _turned_away(e):
                refused.set_result(e)
            for bus in buses:
                bus._refused(e)
            log.debug("NATS client error: %r", e)

        delay, started = 0.1, time.monotonic()
        while not await _reachable(url):
            waited = time.monotonic() - started
            if give_up_after is not None and waited + delay > give_up_after:
                raise wire.unreachable(url)
            log.warning("NATS not reachable at %s; retrying in %.1f s", url, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
        # Reachable now; from here on nats-py reconnects by itself, forever.
        connecting = asyncio.ensure_future(nats.connect(
            url, name=name, connect_timeout=2, allow_reconnect=True,
            max_reconnect_attempts=-1, reconnect_time_wait=0.5,
            disconnected_cb=disconnected, reconnected_cb=reconnected, error_cb=error, **opts))
        try:
            either: set[asyncio.Future[Any]] = {connecting, refused}
            await asyncio.wait(either, timeout=give_up_after or 30.0,
                               return_when=asyncio.FIRST_COMPLETED)
            if not connecting.done():
                connecting.cancel()
                await asyncio.wait({connecting})  # ended, without raising its cancellation
                if refused.done():
                    raise NotAuthorized(
                        f"cannot connect to NATS at {url}: "
                        + _turned_away_because(refused.result(), identity, ca))
                raise Unavailable(f"cannot connect to NATS at {url}: no answer to the "
                                  f"handshake in {give_up_after or 30.0:g} s")
            nc = connecting.result()
        except (TimeoutError, OSError, nats.errors.Error) as e:
            raise Unavailable(f"cannot connect to NATS at {url}: {e!r}") from None
        closing.append(nc)
        if metrics:
            metrics.bus_connected.set(1)
        bus = cls(nc, host=host, metrics=metrics, replicas=replicas, kv_ttl_s=kv_ttl_s,
                  identity=identity)
        buses.append(bus)
        return bus

    async def stop_serving(self) -> None:
        """Take no new requests (the micro services leave NATS); those in flight go on."""
        for svc in self._services:
            await svc.stop()
        self._services.clear()

    async def close(self) -> None:
        """The one way to end a Bus, for an agent and for a CLI command alike: stop serving,
        let in-flight requests finish (10 s at most), drain the connection and close it."""
        await self.stop_serving()
        if self._inflight:
            await asyncio.wait(self._inflight, timeout=10)
        if not self.nc.is_closed:
            try:
                await self.nc.drain()
            except (TimeoutError, nats.errors.Error):
                await self.nc.close()

    # -- requests ---------------------------------------------------------------------------

    async def request(self, subject: str, req: Any, resp_type: type, *, timeout: float = 10.0,
                      idempotency_key: str | None = None) -> Any:
        """One request-reply; a subject this identity may not publish to fails at once with
        ``Forbidden`` (the server says so on the connection, not in a reply)."""
        headers, payload = wire.request_parts(req, idempotency_key)
        waiting = _Waiting(asyncio.current_task())
        key = subject.lower()
        self._waiting.setdefault(key, []).append(waiting)
        try:
            msg = await self.nc.request(subject, payload, timeout=timeout, headers=headers)
        except asyncio.CancelledError:
            task = waiting.task
            if waiting.refused and task is not None and task.uncancel() == 0:
                raise wire.refused(subject, self.identity) from None
            raise
        except nats.errors.NoRespondersError:
            raise wire.no_responders(subject) from None
        except nats.errors.TimeoutError:
            raise wire.timed_out(subject, timeout) from None
        except nats.errors.ConnectionClosedError:
            raise Unavailable("not connected to NATS") from None
        finally:
            pending = self._waiting.get(key, [])
            if waiting in pending:
                pending.remove(waiting)
            if not pending:
                self._waiting.pop(key, None)
        return wire.reply_value(msg.headers, msg.data, resp_type)

    def _refused(self, e: Exception) -> None:
        """The server refused a publish of ours: end the requests waiting on that subject
        (cancelled here, turned into ``Forbidden`` in ``request``)."""
        m = _PUBLISH_REFUSED.search(str(e).lower())
        for waiting in self._waiting.get(m.group(1), []) if m else []:
            if not waiting.refused and waiting.task is not None:
                waiting.refused = True
                waiting.task.cancel()

    async def call(self, host: str, spec: EndpointSpec[Req, Resp], req: Req, *,
                   timeout: float = 10.0, idempotency_key: str | None = None) -> Resp:
        """Call ``spec`` on its agent of ``host``; the reply is decoded as ``spec.response``."""
        return cast(Resp, await self.request(
            subjects.command(host, spec.service, spec.verb), req, spec.response,
            timeout=timeout, idempotency_key=idempotency_key))

    # -- serving ----------------------------------------------------------------------------

    async def serve(self, svc: str, version: str,
                    bindings: Sequence[tuple[EndpointSpec[Any, Any], Handler]],
                    *, metadata: dict[str, str]) -> Service:
        """Register a NATS micro service with one endpoint per (spec, handler) binding."""
        from nats.micro import add_service

        service = await add_service(
            self.nc, name=subjects.micro_name(svc), version=version,
            description=f"Phyllome {svc} agent", metadata=metadata)
        for spec, fn in bindings:
            await service.add_endpoint(
                name=spec.verb, subject=subjects.command(self.host, svc, spec.verb),
                handler=self._handler(spec, fn), queue_group=f"phy-{svc}",
                metadata={"request": _tag(spec.request), "response": _tag(spec.response)})
        self._services.append(service)
        return service

    def _handler(self, spec: EndpointSpec[Any, Any],
                 fn: Callable[[Any], Awaitable[Any]]) -> Callable[[Request], Awaitable[None]]:
        async def handle(req: Request) -> None:
            # A task per request: a slow handler must not hold up the endpoint's subscription.
            task = asyncio.create_task(self._dispatch(spec, fn, req))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

        return handle

    async def _dispatch(self, spec: EndpointSpec[Any, Any], fn: Handler, req: Request) -> None:
        started = time.perf_counter()
        origin = f"{self.host}/{spec.service}.{spec.verb}"
        key = (req.headers or {}).get(IDEMPOTENCY_HEADER)
        if key:
            outcome, (headers, body) = await self._once(spec, fn, req, key, origin)
        else:
            outcome, (headers, body) = await self._run(spec, fn, req, origin)
        try:
            await req.respond(body, headers=headers)
        except nats.errors.Error as e:
            log.warning("could not reply to %s: %r", spec.verb, e)
        self._observe(spec.verb, outcome, started)

    async def _run(self, spec: EndpointSpec[Any, Any], fn: Handler, req: Request,
                   origin: str) -> tuple[str, Reply]:
        """Decode, call the handler, encode: (outcome, reply) for every way it can end, except
        the cancellation of this request's own task, which goes on up."""
        try:
            result = await fn(decode(req.data, spec.request, limit=spec.max_payload))
            return "ok", (None, encode(result))
        except PhyError as e:
            e.origin = e.origin or origin  # an error from a peer keeps the peer's origin
            log.info("%s refused: %s", spec.verb, e)
            return e.kind, to_reply(e)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            # The handler's own wait was cancelled (a job it awaited): an answer, not a hang.
            log.info("%s: its work was cancelled", spec.verb)
            return Cancelled.kind, to_reply(Cancelled(
                f"{spec.verb} was cancelled before it finished; send it again", origin=origin))
        except Exception:
            log.exception("%s failed unexpectedly", spec.verb)
            return Internal.kind, to_reply(Internal(
                f"unexpected error in {spec.verb}; see the agent log", origin=origin))

    async def _once(self, spec: EndpointSpec[Any, Any], fn: Handler, req: Request, key: str,
                    origin: str) -> tuple[str, Reply]:
        """Act on a keyed request once per (host, service, verb, key).

        A repeat — concurrent, later, or after the agent restarted (the reply is kept in KV
        ``idempotency`` for a day) — gets the first reply, failures included; the same key
        with another body is refused. An outcome that did nothing (cancelled, unavailable) is
        not kept: its waiters get it, a later retry acts.
        """
        name = subjects.idempotency_key(self.host, spec.service, spec.verb, key)
        digest = hashlib.sha256(req.data).hexdigest()
        slot = self._idempotent.get(name)
        if slot is not None and time.monotonic() - slot.at < IDEMPOTENCY_TTL_S:
            reply = await asyncio.shield(slot.reply)  # a waiter's cancel must not cancel it
            if slot.request_sha256 != digest:
                return Conflict.kind, self._reused(key, origin)
            return "replayed", reply
        slot = _Slot(digest, asyncio.get_running_loop().create_future(), time.monotonic())
        self._idempotent[name] = slot
        self._idempotent.move_to_end(name)
        while len(self._idempotent) > IDEMPOTENCY_MEMORY:
            self._idempotent.popitem(last=False)
        outcome, reply = Cancelled.kind, to_reply(Cancelled(
            f"the agent stopped before {spec.verb} finished; send it again", origin=origin))
        try:
            kept = await self._kept(name)
            if kept is None:
                outcome, reply = await self._run(spec, fn, req, origin)
                if outcome not in NOT_KEPT:
                    await self._keep(name, KeptReply(request_sha256=digest, headers=reply[0],
                                                     body=reply[1]))
                return outcome, reply
            outcome, reply = "replayed", (kept.headers, kept.body)
            slot.request_sha256 = kept.request_sha256
            if kept.request_sha256 != digest:
                return Conflict.kind, self._reused(key, origin)
            return outcome, reply
        finally:
            if not slot.reply.done():
                slot.reply.set_result(reply)
            if outcome in NOT_KEPT and self._idempotent.get(name) is slot:
                del self._idempotent[name]

    @staticmethod
    def _reused(key: str, origin: str) -> Reply:
        return to_reply(Conflict(
            f"idempotency key {key!r} was first used with another request; a new request "
            "needs a new key", origin=origin))

    async def _kept(self, name: str) -> KeptReply | None:
        """The reply kept in KV for a keyed request, if any (none when KV cannot say)."""
        try:
            kv = await self.kv(subjects.KV_IDEMPOTENCY)
            entry = await kv.get(name)
            return msgspec.json.decode(entry.value or b"", type=KeptReply)
        except nats.js.errors.KeyNotFoundError:
            return None
        except (PhyError, nats.errors.Error, TimeoutError, msgspec.MsgspecError) as e:
            log.warning("idempotency key %s not read from KV (%r); acting on memory alone",
                        name, e)
            return None

    async def _keep(self, name: str, kept: KeptReply) -> None:
        try:
            kv = await self.kv(subjects.KV_IDEMPOTENCY)
            await kv.put(name, msgspec.json.encode(kept))
        except (PhyError, nats.errors.Error, TimeoutError) as e:
            log.warning("idempotency key %s not kept in KV (%r); a restart would act again",
                        name, e)

    def _observe(self, verb: str, outcome: str, started: float) -> None:
        if self.metrics:
            self.metrics.requests.labels(endpoint=verb, outcome=outcome).inc()
            self.metrics.request_duration.labels(endpoint=verb).observe(
                time.perf_counter() - started)

    # -- events -----------------------------------------------------------------------------

    async def ensure_stream(self) -> None:
        """Create PHY_EVENTS when missing (R3 when asked and the cluster has three servers)."""
        config = StreamConfig(
            name=subjects.STREAM, subjects=[subjects.EVENTS_ALL], storage=StorageType.FILE,
            max_age=EVENT_MAX_AGE_S, duplicate_window=DUPLICATE_WINDOW_S,
            num_replicas=self.replicas)
        try:
            await self.js.stream_info(subjects.STREAM)
        except nats.js.errors.NotFoundError:
            try:
                await self.js.add_stream(config)
            except nats.js.errors.BadRequestError:
                await self.js.stream_info(subjects.STREAM)  # created by another agent meanwhile

    async def publish_event(self, subject: str, event: Event, *, timeout: float = 5.0) -> bool:
        """Publish to JetStream with the event id as Nats-Msg-Id; False if it was not stored."""
        try:
            await self.js.publish(subject, encode(event), timeout=timeout,
                                  headers={"Nats-Msg-Id": event.event_id})
        except (TimeoutError, nats.errors.Error) as e:
            log.warning("event %s on %s not stored: %r", event.event_id, subject, e)
            if self.metrics:
                self.metrics.events_failed.inc()
            return False
        if self.metrics:
            self.metrics.events_published.labels(kind=_tag(type(event))).inc()
        return True

    async def publish_events(self, items: Sequence[tuple[str, Event]],
                             *, timeout: float = 10.0) -> int:
        """Publish many events pipelined (acks awaited together); returns how many were stored."""
        futures = []
        for subject, event in items:
            futures.append(await self.js.publish_async(
                subject, encode(event), headers={"Nats-Msg-Id": event.event_id}))
        done, pending = await asyncio.wait(futures, timeout=timeout) if futures else (set(), set())
        stored = sum(1 for f in done if not f.cancelled() and f.exception() is None)
        for f in pending:
            f.cancel()
        if self.metrics:
            self.metrics.events_published.labels(kind="batch").inc(stored)
            self.metrics.events_failed.inc(len(futures) - stored)
        return stored

    async def events(self, subject_filter: str = subjects.EVENTS_ALL, *,
                     since: float | None = None, follow: bool = False,
                     ) -> AsyncGenerator[tuple[str, float, bytes], None]:
        """Replay events (all, or those newer than the unix time ``since``), then follow."""
        stream = self.stream(subject_filter, since=since, follow=follow)
        async with contextlib.aclosing(stream):
            async for event in stream:
                yield event.subject, event.time, event.data

    async def stream(self, subject_filter: str = subjects.EVENTS_ALL, *,
                     since: float | None = None, after: int | None = None,
                     follow: bool = False) -> AsyncGenerator[StreamEvent, None]:
        """``events`` with each event's stream sequence, for a reader that resumes where it
        stopped (the web gateway's ``Last-Event-ID``): ``after`` replays from the event after
        that sequence, ``since`` from a unix time, neither from the first event."""
        if after is not None:
            cfg = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                                 opt_start_seq=after + 1)
        elif since is None:
            cfg = ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
        else:
            cfg = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_TIME,
                                 opt_start_time=datetime.fromtimestamp(since, UTC))
        info = await self.js.stream_info(subjects.STREAM)
        last = info.state.last_seq
        if not follow and (info.state.messages == 0 or (after is not None and after >= last)):
            return
        sub = await self.js.subscribe(subject_filter, ordered_consumer=True, config=cfg,
                                      stream=subjects.STREAM)
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=1.0 if not follow else 3600)
                except nats.errors.TimeoutError:
                    if follow:
                        continue
                    return
                md = msg.metadata
                yield StreamEvent(msg.subject, md.timestamp.timestamp(), msg.data,
                                  md.sequence.stream)
                if not follow and (md.sequence.stream >= last or md.num_pending == 0):
                    return
        finally:
            await sub.unsubscribe()

    # -- key/value state --------------------------------------------------------------------

    async def kv(self, bucket: str) -> KeyValue:
        """The KV bucket, created with its settings the first time anyone asks."""
        if bucket in self._kv:
            return self._kv[bucket]
        try:
            kv = await self.js.key_value(bucket)
        except nats.js.errors.BucketNotFoundError:
            ttl = {subjects.KV_HOSTS: self.kv_ttl_s, subjects.KV_WATCHERS: self.kv_ttl_s,
                   subjects.KV_IDEMPOTENCY: IDEMPOTENCY_TTL_S}.get(bucket)
            try:
                kv = await self.js.create_key_value(
                    bucket=bucket, history=KV_HISTORY.get(bucket, 1), ttl=ttl,
                    replicas=self.replicas)
            except nats.js.errors.BadRequestError:
                kv = await self.js.key_value(bucket)
        self._kv[bucket] = kv
        return kv

    async def kv_values(self, bucket: str, tp: type) -> list[Any]:
        """Every current value of a bucket decoded as ``tp`` (entries that do not decode are
        skipped: a newer agent may have written a newer schema)."""
        out: list[Any] = []
        for key, _revision, value in await self.kv_entries(bucket):
            try:
                out.append(msgspec.json.decode(value, type=tp))
            except msgspec.MsgspecError:
                log.debug("skipping %s/%s: not a %s", bucket, key, tp)
        return out

    async def kv_entries(self, bucket: str) -> list[tuple[str, int, bytes]]:
        """(key, revision, value) of every live key, as of a read begun after this call.

        Concurrent callers share reads: one that began after a caller arrived serves it too
        (it sees every write that caller made before), so a burst costs two or three reads.
        """
        arrived = self._reads_begun.get(bucket, 0)
        lock = self._read_locks.setdefault(bucket, asyncio.Lock())
        async with lock:
            number, entries = self._last_reads.get(bucket, (0, []))
            if number > arrived:
                return entries
            number = self._reads_begun[bucket] = self._reads_begun.get(bucket, 0) + 1
            entries = await self._read_bucket(bucket)
            self._last_reads[bucket] = (number, entries)
            return entries

    async def _read_bucket(self, bucket: str) -> list[tuple[str, int, bytes]]:
        """One pass with a pull consumer, whose pending count is exact when it is created (a
        KV watcher may say "all in" while a value is still in flight)."""
        await self.kv(bucket)  # the bucket exists from here on
        stream, prefix = f"KV_{bucket}", f"$KV.{bucket}."
        live: dict[str, tuple[int, bytes]] = {}
        consumer = ""
        try:
            sub = await self.js.pull_subscribe(
                f"{prefix}>", stream=stream,
                config=ConsumerConfig(deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
                                      ack_policy=AckPolicy.NONE, inactive_threshold=60.0))
            try:
                info = await sub.consumer_info()
                consumer, remaining = info.name, info.num_pending or 0
                while remaining > 0:
                    for msg in await sub.fetch(min(remaining, 1000), timeout=10):
                        remaining = msg.metadata.num_pending or 0
                        key = msg.subject.removeprefix(prefix)
                        if wire.kv_deleted(msg.headers):  # deleted or expired
                            live.pop(key, None)
                        elif msg.data:
                            live[key] = (msg.metadata.sequence.stream, msg.data)
            finally:
                await sub.unsubscribe()
                if consumer:  # unsubscribing leaves the ephemeral consumer on the server
                    with contextlib.suppress(nats.errors.Error, TimeoutError):
                        await self.js.delete_consumer(stream, consumer)
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as e:
            raise wire.kv_read_failed(bucket, e) from None
        return [(key, rev, value) for key, (rev, value) in live.items()]


def _turned_away(e: Exception) -> bool:
    """Whether a connect-time error means the server will not take this client as it is."""
    return (isinstance(e, nats.errors.AuthorizationError | ssl.SSLCertVerificationError)
            or "authorization violation" in str(e).lower())


def _turned_away_because(e: Exception, identity: str, ca: str) -> str:
    return wire.turned_away_because(isinstance(e, ssl.SSLCertVerificationError), identity, ca)


def _tag(tp: type) -> str:
    cfg = getattr(tp, "__struct_config__", None)
    return str(getattr(cfg, "tag", None) or tp.__name__)


async def _reachable(url: str) -> bool:
    """Whether any server of ``url`` (comma-separated) accepts a TCP connection."""
    for one in url.split(","):
        parsed = urlsplit(one.strip() if "://" in one else f"nats://{one.strip()}")
        try:
            _reader, writer = await asyncio.wait_for(
                asyncio.open_connection(parsed.hostname or "127.0.0.1", parsed.port or 4222), 2)
        except (TimeoutError, OSError):
            continue
        writer.close()
        await writer.wait_closed()
        return True
    return False
