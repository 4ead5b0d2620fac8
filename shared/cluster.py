"""The cluster as the replicated KV buckets show it: hosts up or down, their resources, every VM.

Nothing here asks a host. ``phyllome hosts``, ``phyllome vm list --all`` and placement read
KV ``hosts`` (heartbeats with a TTL) and KV ``vms`` (one record per VM) in one pass each, so
they answer while a host is down, and in well under a second with 1,000 VMs::

    views = await host_views_on(bus)          # [HostView(host="a", state="up", ...), ...]
    records = await cluster_vms(bus)          # VMs of a down host come back state="unknown"

What a host has comes from its agents' heartbeats: each agent measures its part before
every beat (``Agent.on_beat``); a host's view merges the parts of its agents' records.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Iterable
from typing import TYPE_CHECKING, Any, Literal

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from shared import subjects, wire
from shared.errors import Unavailable
from shared.messages.hardware import HostCaps, HostResources
from shared.messages.hosts import Heartbeat
from shared.messages.storage import PoolRoom
from shared.messages.vm import VmRecord

if TYPE_CHECKING:
    from shared.bus import Bus

log = logging.getLogger("phyllome.cluster")

HostState = Literal["up", "down"]


class HostView(msgspec.Struct, frozen=True, kw_only=True, tag="cluster.host.v1"):
    """One host as the cluster sees it (``phyllome hosts``)."""

    host: str
    state: HostState
    agents: list[str] = []
    last_beat: float = 0.0
    age_s: float | None = None
    caps: HostCaps | None = None
    resources: HostResources | None = None
    pools: dict[str, PoolRoom] = {}
    vms: int = 0
    # memory promised to the VMs defined there, as its vm agent's heartbeat says (None: no
    # vm agent, or one from before the figure)
    vm_memory_mib: int | None = None
    reason: str = ""


# -- reading a stream's last message per subject in one pass ---------------------------------


async def last_per_subject(bus: Bus, stream: str, subject: str,
                           timeout: float = 5.0) -> list[Msg]:
    """The newest message of every subject matching ``subject`` in ``stream``.

    One ordered push consumer instead of a request per key: 1,000 KV entries arrive in tens
    of milliseconds where ``kv.keys()`` plus ``kv.get()`` each take a round trip.
    """
    queue: asyncio.Queue[Msg] = asyncio.Queue()

    async def deliver(msg: Msg) -> None:
        queue.put_nowait(msg)

    try:
        sub = await bus.js.subscribe(subject, stream=stream, cb=deliver, ordered_consumer=True,
                                     deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
                                     inactive_threshold=30.0)
    except nats.js.errors.NotFoundError:
        return []
    except (TimeoutError, nats.errors.Error) as e:
        raise Unavailable(f"cannot read {stream} ({subject}): {e!r}") from None
    out: list[Msg] = []
    try:
        info = await sub.consumer_info()
        delivered = info.delivered.consumer_seq if info.delivered else 0
        if info.num_pending == 0 and not delivered and queue.empty():
            return out
        while True:
            msg = await asyncio.wait_for(queue.get(), timeout)
            out.append(msg)
            if msg.metadata.num_pending == 0:
                return out
    except TimeoutError:
        raise Unavailable(f"reading {stream} ({subject}) stalled for {timeout} s") from None
    finally:
        await sub.unsubscribe()


def decode_all(entries: Iterable[tuple[str, int, bytes]], tp: type) -> list[Any]:
    out: list[Any] = []
    for key, _rev, value in entries:
        try:
            out.append(msgspec.json.decode(value, type=tp))
        except msgspec.MsgspecError:  # a newer schema, or a foreign value: not ours to show
            log.debug("skipping %s: not a %s", key, tp.__name__)
    return out


# -- hosts -------------------------------------------------------------------------------------


def host_views(heartbeats: Iterable[Heartbeat], *, now: float, ttl_s: float,
               known: Iterable[str] = (), vm_hosts: Iterable[str] = ()) -> list[HostView]:
    """Group live heartbeats by host: a host with a key in KV ``hosts`` is up.

    The bucket's TTL is kept by the NATS server, which drops a key its agent stopped
    rewriting: liveness is judged by the server's clock alone, so a host whose clock is off,
    or an observer whose clock jumps, sees the same answer. ``age_s`` (by the beats' own
    clocks) is for people. ``known`` are hosts seen before (in the events) and ``vm_hosts``
    those VM records name; without a live heartbeat they are listed ``down``.
    """
    by_host: dict[str, list[Heartbeat]] = {}
    for hb in heartbeats:
        by_host.setdefault(hb.host, []).append(hb)
    vm_count: dict[str, int] = {}
    for h in vm_hosts:
        vm_count[h] = vm_count.get(h, 0) + 1
    views = []
    for host, beats in by_host.items():
        last = max(b.time for b in beats)
        details = [b.details for b in beats]
        skew = "" if abs(now - last) <= ttl_s else (
            f"its last beat is {now - last:.0f} s away by this clock: a clock is off")
        views.append(HostView(
            host=host, state="up", agents=sorted(b.agent for b in beats), last_beat=last,
            age_s=round(now - last, 1),
            caps=next((d.caps for d in details if d.caps is not None), None),
            resources=next((d.resources for d in details if d.resources is not None), None),
            pools={name: room for d in details for name, room in d.pools.items()},
            vms=vm_count.get(host, 0), reason=skew,
            vm_memory_mib=next((d.vm_memory_mib for d in details
                                if d.vm_memory_mib is not None), None)))
    for host in {*known, *vm_count} - set(by_host):
        views.append(HostView(host=host, state="down", vms=vm_count.get(host, 0),
                              reason="no heartbeat (expired)"))
    return sorted(views, key=lambda v: v.host)


async def known_hosts(bus: Bus) -> set[str]:
    """Hosts whose agents started, or that were said down or up, within the stream's age."""
    await bus.ensure_stream()
    started, host_events = await asyncio.gather(
        last_per_subject(bus, subjects.STREAM, subjects.events_filter(kind="agent.started")),
        last_per_subject(bus, subjects.STREAM, subjects.events_filter(kind="host.>")))
    return ({m.subject.split(".")[2] for m in started}
            | {m.subject.rsplit(".", 1)[-1] for m in host_events})


async def hosts_ttl(bus: Bus) -> float:
    """The TTL of KV ``hosts`` as its creator set it (agents may run with another than ours)."""
    await bus.kv(subjects.KV_HOSTS)
    info = await bus.js.stream_info(f"KV_{subjects.KV_HOSTS}")
    return float(info.config.max_age or bus.kv_ttl_s)


async def read_together(*reads: Awaitable[Any]) -> list[Any]:
    """Run reads together; a JetStream that does not answer becomes a clear Unavailable."""
    try:
        return list(await asyncio.gather(*reads))
    except (TimeoutError, nats.errors.Error) as e:
        raise Unavailable(f"the cluster's JetStream did not answer ({e!r}); if a server just "
                          "went down, its streams are electing new leaders: retry in a few "
                          "seconds") from None


async def heartbeats(bus: Bus) -> list[tuple[str, int, Heartbeat]]:
    """Every record of KV ``hosts`` with its key and revision: a revision that grows tells a
    watcher that a host beat again, whatever that host's clock says."""
    (entries,) = await read_together(bus.kv_entries(subjects.KV_HOSTS))
    return [(key, rev, hb) for key, rev, value in entries
            for hb in decode_all([(key, rev, value)], Heartbeat)]


class HeartbeatFollower:
    """One long-lived consumer of KV ``hosts``: the last beat of every key, then each new one.

    A full read per look costs a consumer created and deleted (through JetStream's meta
    group) and every key sent again; this keeps one pull consumer for the follower's life
    and, at each ``poll``, takes only what was written since the last one, in one batch (a
    push consumer would wake the process once per heartbeat written). Deletes and purges
    (an agent that stopped) and the server's TTL markers (``Nats-Marker-Reason``) remove the
    key. A key the server expired without a marker stays until ``entries(prune_after=...)``
    drops it; its revision no longer grows, which is what a watcher judges by::

        follower = HeartbeatFollower(bus)
        await follower.start()           # the last beat of every key; again if it went stale
        await follower.poll()            # what was written since (each beat period)
        beats = follower.entries()       # [(key, revision, Heartbeat), ...]
    """

    PREFIX = f"$KV.{subjects.KV_HOSTS}."

    def __init__(self, bus: Bus, *, inactive_s: float = 120.0) -> None:
        self.bus = bus
        self.inactive_s = inactive_s  # the server drops the consumer when not polled as long
        self.ready = False  # the first pass (the last beat of every key) is in
        self.started_at = 0.0  # monotonic time of the last (re)start
        self._beats: dict[str, tuple[int, Heartbeat, float]] = {}
        self._sub: Any = None

    @property
    def active(self) -> bool:
        return self._sub is not None

    async def start(self) -> None:
        """(Re)create the consumer and take the last value of every key."""
        await self.stop()
        self._beats, self.started_at = {}, time.monotonic()
        try:
            await self.bus.kv(subjects.KV_HOSTS)
            self._sub = await self.bus.js.pull_subscribe(
                f"{self.PREFIX}>", stream=f"KV_{subjects.KV_HOSTS}",
                config=ConsumerConfig(deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
                                      ack_policy=AckPolicy.NONE,
                                      inactive_threshold=self.inactive_s))
        except (TimeoutError, nats.errors.Error, nats.js.errors.Error) as e:
            raise Unavailable(f"cannot watch KV {subjects.KV_HOSTS}: {e!r}") from None
        await self.poll()
        self.ready = True

    async def poll(self) -> int:
        """Take every record written since the last poll; how many. A consumer the server
        lost raises Unavailable and leaves the follower inactive (``start`` again)."""
        taken = 0
        try:
            while True:
                pending = (await self._sub.consumer_info()).num_pending or 0
                if not pending:
                    return taken
                for msg in await self._sub.fetch(min(pending, 1000), timeout=10):
                    self._take(msg)
                    taken += 1
        except (TimeoutError, nats.errors.Error, nats.js.errors.Error, AttributeError) as e:
            await self.stop()
            raise Unavailable(f"the watch of KV {subjects.KV_HOSTS} failed: {e!r}") from None

    def _take(self, msg: Msg) -> None:
        key = msg.subject.removeprefix(self.PREFIX)
        if wire.kv_deleted(msg.headers):
            self._beats.pop(key, None)
        elif msg.data:
            try:
                hb = msgspec.json.decode(msg.data, type=Heartbeat)
            except msgspec.MsgspecError:  # a newer schema, or a foreign value
                log.debug("skipping %s: not a Heartbeat", key)
            else:
                self._beats[key] = (msg.metadata.sequence.stream, hb, time.monotonic())

    def received(self, key: str) -> float | None:
        """Monotonic time the last record of ``key`` was taken, None if none is held."""
        got = self._beats.get(key)
        return got[2] if got else None

    def entries(self, *, prune_after: float | None = None) -> list[tuple[str, int, Heartbeat]]:
        """(key, revision, Heartbeat) of every key held; keys not rewritten for
        ``prune_after`` seconds are dropped first (expired on the server, no marker)."""
        if prune_after is not None:
            old = time.monotonic() - prune_after
            for key in [k for k, (_r, _hb, at) in self._beats.items() if at < old]:
                del self._beats[key]
        return [(key, rev, hb) for key, (rev, hb, _at) in self._beats.items()]

    async def stop(self) -> None:
        """Drop the consumer."""
        sub, self._sub = self._sub, None
        self.ready = False
        if sub is None:
            return
        with contextlib.suppress(TimeoutError, nats.errors.Error, nats.js.errors.Error):
            consumer = (await sub.consumer_info()).name
            await sub.unsubscribe()
            await self.bus.js.delete_consumer(f"KV_{subjects.KV_HOSTS}", consumer)


async def host_views_on(bus: Bus) -> list[HostView]:
    """Every host of the cluster from KV ``hosts``, KV ``vms`` and the host events."""
    beats, records, known, ttl = await read_together(
        bus.kv_entries(subjects.KV_HOSTS), bus.kv_entries(subjects.KV_VMS),
        known_hosts(bus), hosts_ttl(bus))
    vms: list[VmRecord] = decode_all(records, VmRecord)
    return host_views(decode_all(beats, Heartbeat), now=time.time(), ttl_s=ttl,
                      known=known, vm_hosts=[r.host for r in vms])


async def cluster_vms(bus: Bus) -> list[VmRecord]:
    """Every VM of every host from KV ``vms``; a VM whose host is down is ``unknown``."""
    beats, records, ttl = await read_together(
        bus.kv_entries(subjects.KV_HOSTS), bus.kv_entries(subjects.KV_VMS), hosts_ttl(bus))
    now = time.time()
    up = {v.host for v in host_views(decode_all(beats, Heartbeat), now=now,
                                     ttl_s=ttl) if v.state == "up"}
    out: list[VmRecord] = []
    for rec in decode_all(records, VmRecord):
        if rec.host not in up:
            rec = msgspec.structs.replace(rec, state="unknown",
                                          reason=f"host {rec.host} is down")
        out.append(rec)
    return sorted(out, key=lambda r: (r.host, r.spec.name))
