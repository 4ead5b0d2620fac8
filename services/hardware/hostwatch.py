"""The hardware agent speaks for its host, and watches the others: ``HostDown``/``HostUp``.

A few hardware agents of the cluster watch (``WATCHERS``, three): each holds a lease, a key
of KV ``watchers`` (``0``, ``1``, ``2``) that it created only where absent and rewrites every
beat; the bucket's TTL (the heartbeats') drops the key of a watcher that died, and another
hardware agent takes the slot at its next beat. Every host watching every other would cost
the servers N² heartbeat deliveries (``docs/scale.md``); three watchers cost 3N.

A watcher follows KV ``hosts`` (one long-lived consumer: each heartbeat arrives once, in the
batch of the beat period it was written in), looks at the last beat of every key once per
heartbeat period, and publishes ``phy.evt.<host>.hardware.host.down.<other>`` when another
host's heartbeats stop (``host.up`` when they come back). Every watcher derives the same
event id from the start time of that host's agents (the last beat each watcher saw can
differ by one beat), and JetStream drops duplicate ids, so the stream holds one event per
host going down::

    agent.spawn(watch(agent), "host-watch")     # what service.setup does
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from typing import Any

import msgspec
import nats.errors
import nats.js.errors

from shared import subjects
from shared.agent import Agent
from shared.bus import Bus
from shared.cluster import HeartbeatFollower
from shared.codec import to_builtins
from shared.errors import Unavailable
from shared.messages import HostDown, HostUp
from shared.messages.hosts import Heartbeat
from shared.subjects import heartbeat_key

log = logging.getLogger("phyllome.hardware.hosts")

WATCHERS = 3  # hosts that watch the others at once (leases in KV watchers)


class Lease:
    """One of the host watch's ``slots`` leases, held by ``holder`` while ``hold`` is called
    at least once per TTL of the bucket::

        lease = Lease(bus, "h1")
        if await lease.hold():    # each beat: renews the slot held, or takes a free one
            ...                   # watch
    """

    def __init__(self, bus: Bus, holder: str, slots: int | None = None) -> None:
        self.bus, self.holder, self.slots = bus, holder, slots or WATCHERS
        self.slot: int | None = None
        self._revision = 0
        self._tries = -1  # -1: not tried yet

    async def hold(self) -> bool:
        """Renew the slot held, else try to take one: True while a slot is ours.

        The first call tries every slot, and takes back one this holder held before (an
        agent restarted within the TTL). Later calls of an agent without a lease try one
        slot each, in turn: one request a beat per host, not three or six (most hosts hold
        none), and a lapsed slot is taken within ``slots`` beats of its expiry (the other
        watchers watch meanwhile)."""
        kv = await self.bus.kv(subjects.KV_WATCHERS)
        me = self.holder.encode()
        if self.slot is not None:
            try:
                self._revision = await kv.update(str(self.slot), me, last=self._revision)
                return True
            except nats.js.errors.APIError:  # it lapsed, and another took it
                log.warning("host watch: lease %d lapsed; %s watches no more unless it "
                            "takes another", self.slot, self.holder)
                self.slot = None
        first, self._tries = self._tries < 0, self._tries + 1
        for slot in range(self.slots) if first else [self._tries % self.slots]:
            if await self._take(kv, slot, me, own_too=first):
                self.slot = slot
                log.info("host watch: %s holds lease %d of %d", self.holder, slot,
                         self.slots)
                return True
        return False

    async def _take(self, kv: Any, slot: int, me: bytes, *, own_too: bool) -> bool:
        try:
            self._revision = await kv.create(str(slot), me)
            return True
        except nats.js.errors.APIError:  # taken: ours from before a restart?
            if not own_too:
                return False
        try:
            entry = await kv.get(str(slot))
        except nats.js.errors.KeyNotFoundError:
            return False
        if entry.value != me or not entry.revision:
            return False
        try:
            self._revision = await kv.update(str(slot), me, last=entry.revision)
        except nats.js.errors.APIError:
            return False
        return True

    async def release(self) -> None:
        """Give the slot up at once (an agent that drains), so another takes it next beat."""
        slot, self.slot = self.slot, None
        if slot is None:
            return
        kv = await self.bus.kv(subjects.KV_WATCHERS)
        with contextlib.suppress(nats.errors.Error):
            await kv.delete(str(slot), last=self._revision)


class _Seen(msgspec.Struct, kw_only=True):
    revision: int
    changed: float  # monotonic time the revision last grew
    last_beat: float
    started: float
    agents: list[str]
    up: bool = True


class HostWatch:
    """Turns successive snapshots of KV ``hosts`` into ``HostDown``/``HostUp`` events.

    A host is down when none of its heartbeat keys has been rewritten for ``ttl_s`` (by our
    clock: no trust in the other hosts' clocks), or when all its keys are gone. Event ids
    come from the agents' start time in the heartbeats, so every watcher publishes the
    same id for one run of a host, whichever beat it saw last.
    """

    def __init__(self, observer: str, ttl_s: float) -> None:
        self.observer = observer
        self.ttl_s = ttl_s
        self.seen: dict[str, _Seen] = {}

    def observe(self, entries: Iterable[tuple[str, int, Heartbeat]],
                now: float) -> list[HostDown | HostUp]:
        by_host: dict[str, list[tuple[int, Heartbeat]]] = {}
        for _key, rev, hb in entries:
            by_host.setdefault(hb.host, []).append((rev, hb))
        events: list[HostDown | HostUp] = []
        for host, beats in by_host.items():
            rev = max(r for r, _ in beats)
            last = max(hb.time for _, hb in beats)
            started = max(hb.started for _, hb in beats)
            agents = sorted(hb.agent for _, hb in beats)
            old = self.seen.get(host)
            if old is None:
                log.debug("%s watches host %s (agents %s)", self.observer, host, agents)
            if old is None or rev > old.revision:
                if old is not None and not old.up:
                    events.append(HostUp(
                        host=self.observer, up_host=host, agents=agents,
                        event_id=f"host-up-{host}-{int(started * 1000)}"))
                self.seen[host] = _Seen(revision=rev, changed=now, last_beat=last,
                                        started=started, agents=agents)
        for host, s in self.seen.items():
            if not s.up:
                continue
            gone = host not in by_host
            if gone or now - s.changed >= self.ttl_s:
                s.up = False
                reason = ("its agents removed their heartbeats" if gone and
                          now - s.changed < self.ttl_s else
                          f"no heartbeat for {self.ttl_s:.0f} s")
                events.append(HostDown(
                    host=self.observer, down_host=host, last_beat=s.last_beat,
                    agents=s.agents, reason=reason,
                    event_id=f"host-down-{host}-{int(s.started * 1000)}"))
        return events


async def watch(agent: Agent) -> None:
    """The host watch of one hardware agent (see the module doc); runs until it drains.

    One long-lived consumer of KV ``hosts`` (``HeartbeatFollower``) keeps the last beat of
    every key; each beat period takes what was written since and ``HostWatch.observe`` looks
    at that map. The watch must bring back this agent's own beats: when it has not for half
    the TTL (a server restart, a consumer lost), it is re-created before any other host
    could look down for it.
    """
    ttl_s, beat_s = agent.cfg.heartbeat_ttl_s, agent.cfg.heartbeat_s
    lease = Lease(agent.bus, agent.host)
    host_watch = HostWatch(agent.host, ttl_s)
    follower = HeartbeatFollower(agent.bus, inactive_s=max(10 * beat_s, 60.0))
    own = heartbeat_key(agent.host, agent.name)
    try:
        while not agent.stopping.is_set():
            try:
                if await lease.hold():
                    await _look(agent, host_watch, follower, own, ttl_s / 2, ttl_s)
                elif follower.active:  # another took our lapsed lease: it watches now
                    await follower.stop()
                    host_watch = HostWatch(agent.host, ttl_s)
            except (Unavailable, TimeoutError, nats.errors.Error) as e:
                log.warning("host watch: %s; trying again in %g s",
                            e.message if isinstance(e, Unavailable) else repr(e), beat_s)
            try:
                await asyncio.wait_for(agent.stopping.wait(), beat_s)
            except TimeoutError:
                pass
    finally:
        await follower.stop()
        await lease.release()


async def _look(agent: Agent, host_watch: HostWatch, follower: HeartbeatFollower, own: str,
                stale_after: float, ttl_s: float) -> None:
    """One beat of the watch: take what was written since the last (after (re)creating the
    consumer if needed), then observe the map."""
    if follower.active:
        await follower.poll()
        now = time.monotonic()
        seen = max(follower.received(own) or 0.0, follower.started_at)
        if now - seen > stale_after:
            log.warning("host watch: the watch of KV hosts brought no beat of this agent for "
                        "%.0f s (NATS reconnected, or a server restarted): re-creating it",
                        now - seen)
            await follower.stop()
    if not follower.active:
        await follower.start()
        log.info("host watch: following KV hosts (one consumer, polled each beat)")
    for event in host_watch.observe(follower.entries(prune_after=2 * ttl_s), time.monotonic()):
        ident = event.down_host if isinstance(event, HostDown) else event.up_host
        kind = "host.down" if isinstance(event, HostDown) else "host.up"
        log.info("%s: %s", kind, to_builtins(event))
        await agent.publish(kind, event, ident)
