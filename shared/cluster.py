"""The cluster as the replicated KV buckets show it: hosts up or down, their resources, every VM.

Nothing here asks a host. ``phyllome hosts``, ``phyllome vm list --all`` and placement read
KV ``hosts`` (heartbeats with a TTL) and KV ``vms`` (one record per VM) in one pass each, so
they answer while a host is down, and in well under a second with 1,000 VMs::

    views = await host_views_on(bus)          # [HostView(host="a", state="up", ...), ...]
    records = await cluster_vms(bus)          # VMs of a down host come back state="unknown"

Every agent runs ``watch(agent)`` for its lifetime: it keeps the free resources in the
agent's heartbeat current (the hardware agent: CPUs, memory, firmware, swtpm, bindable
GPUs; the storage agent: free bytes per pool). The hardware agent of each host also watches
the other hosts' heartbeats and publishes ``HostDown`` when one stops (``HostUp`` when it
comes back). Every watcher derives the same event id from the start time of the host's
agents (the last beat each watcher saw can differ by one beat), and JetStream drops
duplicate ids, so the stream holds one event per host going down.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from collections.abc import Awaitable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy

from shared import subjects
from shared.codec import to_builtins
from shared.errors import Unavailable
from shared.messages import Event, Heartbeat, HostDown, HostUp
from shared.messages.vm import VmRecord

if TYPE_CHECKING:
    from shared.agent import Agent
    from shared.bus import Bus

log = logging.getLogger("phyllome.cluster")

HOST_AGENT = "hardware"  # speaks for its host: resources and the host-down watch
HostState = Literal["up", "down"]
OVMF_DIRS = ("/usr/share/OVMF", "/usr/share/edk2/ovmf", "/usr/share/qemu")


class HostView(msgspec.Struct, frozen=True, kw_only=True, tag="cluster.host.v1"):
    """One host as the cluster sees it (``phyllome hosts``)."""

    host: str
    state: HostState
    agents: list[str] = []
    last_beat: float = 0.0
    age_s: float | None = None
    caps: dict[str, Any] = {}
    resources: dict[str, Any] = {}
    pools: dict[str, Any] = {}
    vms: int = 0
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


def _decode_all(entries: Iterable[tuple[str, int, bytes]], tp: type) -> list[Any]:
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
        details: dict[str, dict[str, Any]] = {b.agent: b.details for b in beats}
        hw = details.get(HOST_AGENT, {})
        skew = "" if abs(now - last) <= ttl_s else (
            f"its last beat is {now - last:.0f} s away by this clock: a clock is off")
        views.append(HostView(
            host=host, state="up", agents=sorted(b.agent for b in beats), last_beat=last,
            age_s=round(now - last, 1), caps=hw.get("caps", {}),
            resources=hw.get("resources", {}), pools=details.get("storage", {}).get("pools", {}),
            vms=vm_count.get(host, 0), reason=skew))
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


async def _read(*reads: Awaitable[Any]) -> list[Any]:
    """Run reads together; a JetStream that does not answer becomes a clear Unavailable."""
    try:
        return list(await asyncio.gather(*reads))
    except (TimeoutError, nats.errors.Error) as e:
        raise Unavailable(f"the cluster's JetStream did not answer ({e!r}); if a server just "
                          "went down, its streams are electing new leaders: retry in a few "
                          "seconds") from None


async def host_views_on(bus: Bus) -> list[HostView]:
    """Every host of the cluster from KV ``hosts``, KV ``vms`` and the host events."""
    beats, records, known, ttl = await _read(
        bus.kv_entries(subjects.KV_HOSTS), bus.kv_entries(subjects.KV_VMS),
        known_hosts(bus), hosts_ttl(bus))
    vms: list[VmRecord] = _decode_all(records, VmRecord)
    return host_views(_decode_all(beats, Heartbeat), now=time.time(), ttl_s=ttl,
                      known=known, vm_hosts=[r.host for r in vms])


async def cluster_vms(bus: Bus) -> list[VmRecord]:
    """Every VM of every host from KV ``vms``; a VM whose host is down is ``unknown``."""
    beats, records, ttl = await _read(
        bus.kv_entries(subjects.KV_HOSTS), bus.kv_entries(subjects.KV_VMS), hosts_ttl(bus))
    now = time.time()
    up = {v.host for v in host_views(_decode_all(beats, Heartbeat), now=now,
                                     ttl_s=ttl) if v.state == "up"}
    out: list[VmRecord] = []
    for rec in _decode_all(records, VmRecord):
        if rec.host not in up:
            rec = msgspec.structs.replace(rec, state="unknown",
                                          reason=f"host {rec.host} is down")
        out.append(rec)
    return sorted(out, key=lambda r: (r.host, r.spec.name))


# -- what a host has ---------------------------------------------------------------------------


def memory_bytes(meminfo: str) -> tuple[int, int]:
    """(MemTotal, MemAvailable) in bytes from the text of ``/proc/meminfo``."""
    values = {}
    for line in meminfo.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[name] = int(parts[0]) * 1024
    return values.get("MemTotal", 0), values.get("MemAvailable", values.get("MemFree", 0))


def host_resources(gpus_bindable: list[str]) -> dict[str, Any]:
    """CPUs, memory, UEFI/Secure Boot firmware, swtpm and bindable GPUs of this machine."""
    total, available = memory_bytes(Path("/proc/meminfo").read_text())
    ovmf = [p for d in OVMF_DIRS if Path(d).is_dir() for p in Path(d).iterdir()]
    return {
        "cpus": os.cpu_count() or 1,
        "memory_total_bytes": total,
        "memory_available_bytes": available,
        "uefi": any("CODE" in p.name or p.suffix == ".json" for p in ovmf),
        "secure_boot": any(".ms." in p.name or "secboot" in p.name for p in ovmf),
        "tpm": shutil.which("swtpm") is not None,
        "gpus_bindable": gpus_bindable,
    }


def pool_free(pools: dict[str, Any]) -> dict[str, Any]:
    """The storage agent's pools with ``free_bytes`` measured now."""
    out = {}
    for name, pool in pools.items():
        try:
            st = os.statvfs(pool["path"])
            free = st.f_bavail * st.f_frsize
        except (OSError, KeyError, TypeError):
            free = 0
        out[name] = {**pool, "free_bytes": free}
    return out


def _bindable_gpus(agent: Agent) -> list[str]:
    inventory = getattr(agent.handlers, "inv", None)
    if inventory is None:
        return []
    return [d.address for d in inventory.devices("gpu")
            if d.passthrough is not None
            and d.passthrough.verdict in ("isolated", "with-companions")
            and not d.passthrough.host_loses]


# -- watching the other hosts ------------------------------------------------------------------


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
                now: float) -> list[Event]:
        by_host: dict[str, list[tuple[int, Heartbeat]]] = {}
        for _key, rev, hb in entries:
            by_host.setdefault(hb.host, []).append((rev, hb))
        events: list[Event] = []
        for host, beats in by_host.items():
            rev = max(r for r, _ in beats)
            last = max(hb.time for _, hb in beats)
            started = max(hb.started for _, hb in beats)
            agents = sorted(hb.agent for _, hb in beats)
            old = self.seen.get(host)
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
    """An agent's cluster loop (see the module doc); runs until the agent drains."""
    host_watch = HostWatch(agent.host, agent.cfg.heartbeat_ttl_s)
    first = True
    while not agent.stopping.is_set():
        try:
            if agent.name == HOST_AGENT:
                agent.details["resources"] = await asyncio.to_thread(
                    host_resources, _bindable_gpus(agent))
                entries = [(k, rev, hb) for k, rev, value in
                           await agent.bus.kv_entries(subjects.KV_HOSTS)
                           for hb in _decode_all([(k, rev, value)], Heartbeat)]
                for event in host_watch.observe(entries, time.monotonic()):
                    ident = getattr(event, "down_host", None) or getattr(event, "up_host", "")
                    kind = "host.down" if isinstance(event, HostDown) else "host.up"
                    log.info("%s: %s", kind, to_builtins(event))
                    await agent.publish(kind, event, ident)
            elif agent.name == "storage" and "pools" in agent.details:
                agent.details["pools"] = await asyncio.to_thread(
                    pool_free, agent.details["pools"])
            if first:  # what was measured goes out now, not a heartbeat later
                first = False
                await agent.beat()
        except (Unavailable, TimeoutError, nats.errors.Error) as e:
            log.debug("cluster watch: %r", e)
        try:
            await asyncio.wait_for(agent.stopping.wait(), agent.cfg.heartbeat_s)
        except TimeoutError:
            pass
