"""KV ``vms`` records and ``VmStateChanged`` events of one host's VMs, kept true to the
hypervisor.

The hypervisor is the truth about a VM's state; KV ``vms`` (key: uuid) mirrors it with the
spec. Live events update the record and are published on ``phy.evt.<host>.vm.state.<uuid>``;
a reconciliation pass (at start, after a hypervisor reconnect, and periodically) lists the
domains, corrects KV and publishes what events missed (``missed=True``). All record writes
go through one lock, so the two never race. To find this host's records whose domain is
gone, a full pass reads all of KV ``vms`` (every host's); the periodic passes between two
full ones (``FULL_EVERY``) get only the records this agent knows are its own (those it
wrote or synced since the last full read), so a cluster of N hosts does not read N x its
VMs every interval.

The record names the VM's owner host. A host writes only the records it owns (a domain
of another owner, e.g. a migration's copy on its target, is left alone), starts only the
VMs it owns, and never one a migration has locked; ownership moves only by the migration's
compare-and-set (``lock``, ``hand_over``, ``unlock``)::

    states = VmStates(agent, hypervisor, metrics)
    await states.reconcile()
    agent.spawn(states.bridge(), "events")
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

import msgspec
import nats.errors
import nats.js.errors

from services.vm.hypervisor import Domain, DomainEvent, Hypervisor, Reconnected
from services.vm.metrics import VmMetrics
from shared import subjects
from shared.agent import Agent
from shared.bus import ELECTING
from shared.codec import decode, encode
from shared.errors import Conflict, NotFound, PhyError, Timeout, Unavailable
from shared.messages.vm import Disk, MigrationLock, VmRecord, VmSpec, VmState, VmStateChanged

log = logging.getLogger("phyllome.vm")

RUNNING: frozenset[VmState] = frozenset({"running", "blocked", "paused", "shutting-down",
                                         "pmsuspended"})
STOPPED: frozenset[VmState] = frozenset({"shutoff", "crashed"})
# The state a lifecycle event implies (the domain may have moved on by the time we look).
EVENT_STATE: dict[str, VmState] = {
    "started": "running", "resumed": "running", "rebooted": "running", "suspended": "paused",
    "stopped": "shutoff", "shutdown": "shutting-down", "crashed": "crashed",
    "pmsuspended": "pmsuspended",
}
RECHECK_S = 1.0


def without_secrets(spec: VmSpec) -> VmSpec:
    """The spec as KV ``vms`` keeps it: every host and operator reads KV, so the console
    password stays only in libvirt's domain XML."""
    return msgspec.structs.replace(spec, password="") if spec.password else spec


def refuse_unless_owned(record: VmRecord | None, host: str, name: str, action: str, *,
                        stray_ok: bool = False) -> None:
    """Conflict unless ``host`` owns the VM and no migration holds it. A VM with no record
    yet is this host's. ``stray_ok``: a copy of another owner's VM may be acted on (delete
    removes what a migration left behind)."""
    if record is None:
        return
    if record.host != host:
        if stray_ok:
            return
        raise Conflict(f"VM {name} belongs to host {record.host}, not {host} (this is a copy "
                       f"a migration left or is making): {action} it with --host {record.host}")
    if (m := record.migration) is not None:
        raise Conflict(f"VM {name} is being migrated from {m.source} to {m.target} (job "
                       f"{m.job_id} of the vm agent of {m.source}): {action} it once the "
                       "migration has ended, or cancel that job")


def with_secrets(stored: VmSpec, dom_spec: VmSpec | None) -> VmSpec:
    """A spec from KV with the password libvirt keeps put back (for update and clone)."""
    if dom_spec is None or not dom_spec.password:
        return stored
    return msgspec.structs.replace(stored, password=dom_spec.password)


def _electing(e: Exception) -> Unavailable:
    """A KV ``vms`` call that JetStream did not serve (503, no responders, no reply): most
    often its stream is electing a leader after a server or a link went down."""
    return Unavailable(f"KV {subjects.KV_VMS} did not answer ({e!r}); {ELECTING}")


FULL_EVERY = 10  # of the periodic passes, one reads all of KV vms (30 s each: every 5 min)


class VmStates:
    """The one writer of this host's VM records and state events; see the module docstring."""

    def __init__(self, agent: Agent, hypervisor: Hypervisor, metrics: VmMetrics) -> None:
        self.agent = agent
        self.host = agent.host
        self.hv = hypervisor
        self.metrics = metrics
        self._lock = asyncio.Lock()
        self._claims = asyncio.Lock()  # an action that needs ownership vs a migration's lock
        self._changed = asyncio.Event()
        self._started: dict[str, float] = {}
        self._mine: set[str] = set()  # uuids of this host's records, as far as we know
        self._passes = 0

    async def bridge(self) -> None:
        while True:
            news = await self.hv.news.get()
            try:
                if isinstance(news, Reconnected):
                    self.metrics.hypervisor_reconnects.inc()
                    await self.reconcile()
                elif news.event == "undefined":
                    await self.gone(news.uuid, news.name, "undefined", news.reason)
                else:
                    await self._on_event(news)
            except PhyError as e:
                log.warning("event %r not processed: %s", news, e.message)

    async def _on_event(self, news: DomainEvent) -> None:
        """Record and publish a live event. When the event says the state and we know the VM,
        the hypervisor is not asked again (that would delay every event by a few calls);
        reconciliation corrects whatever this misses."""
        record, _ = await self.load(news.uuid)
        implied = EVENT_STATE.get(news.event)
        if record is not None and implied is not None:
            dom = Domain(uuid=news.uuid, name=news.name, state=implied, reason=news.reason,
                         spec=record.spec, accelerator=record.accelerator,
                         autostart=record.spec.autostart)
        else:
            try:
                dom = await self.hv.domain(news.uuid)
            except NotFound:
                await self.gone(news.uuid, news.name, news.event, news.reason)
                return
        await self.sync(dom, news.event, news.reason)

    async def periodic(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            self._passes += 1
            try:
                await self.reconcile(full=self._passes % FULL_EVERY == 0)
            except PhyError as e:
                log.warning("reconciliation failed: %s", e.message)

    async def reconcile(self, *, full: bool = True) -> None:
        """List the domains; correct KV ``vms``; publish the state changes events missed.
        ``full``: look for this host's records of gone domains in all of KV ``vms``, not
        only among the records this agent knows are its own."""
        if not self.hv.connected:
            return
        self.metrics.reconciliations.inc()
        ours = {d.uuid: d for d in await self.hv.domains() if d.spec is not None}
        for dom in ours.values():
            await self.sync(dom, "", "", missed=True)
        if full:
            records = [r for r in await self.records() if r.host == self.host]
            self._mine = {r.spec.uuid for r in records}
        else:
            records = []
            for uuid in sorted(self._mine - set(ours)):
                rec, _ = await self.load(uuid)
                if rec is None or rec.host != self.host:
                    self._mine.discard(uuid)
                else:
                    records.append(rec)
        for rec in records:
            if rec.spec.uuid not in ours:
                try:  # defined since the listing (a create between the two reads)?
                    await self.hv.domain(rec.spec.uuid)
                    continue
                except NotFound:
                    pass
                await self.gone(rec.spec.uuid, rec.spec.name, "", "", missed=True)

    # -- records and events ---------------------------------------------------------------

    def started_at(self) -> dict[str, float]:
        return dict(self._started)

    async def _kv(self) -> Any:
        return await self.agent.bus.kv(subjects.KV_VMS)

    async def records(self) -> list[VmRecord]:
        """Every record in KV ``vms`` (all hosts), as of a read begun after this call."""
        return list(await self.agent.bus.kv_values(subjects.KV_VMS, VmRecord))

    async def load(self, uuid: str) -> tuple[VmRecord | None, int]:
        kv = await self._kv()
        try:
            entry = await kv.get(uuid)
        except nats.js.errors.KeyNotFoundError:
            return None, 0
        except (nats.js.errors.ServiceUnavailableError, nats.errors.NoRespondersError,
                nats.errors.TimeoutError) as e:
            raise _electing(e) from None
        if not entry.value:
            return None, 0
        return decode(entry.value, VmRecord), entry.revision or 0

    async def _store(self, record: VmRecord, revision: int) -> None:
        """Compare-and-set on the revision we read (this agent is the record's only writer)."""
        kv = await self._kv()
        try:
            if revision:
                await kv.update(record.spec.uuid, encode(record), last=revision)
            else:
                await kv.create(record.spec.uuid, encode(record))
        except (nats.js.errors.ServiceUnavailableError, nats.errors.NoRespondersError,
                nats.errors.TimeoutError) as e:
            raise _electing(e) from None
        except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.APIError):
            raise Conflict(f"the record of VM {record.spec.name} changed under us; "
                           "retry") from None
        if record.host == self.host:
            self._mine.add(record.spec.uuid)
        else:  # handed over to a migration's target
            self._mine.discard(record.spec.uuid)

    async def write(self, spec: VmSpec, dom: Domain, *, revision: int = 1) -> None:
        """Store a VM's record after create, update or clone. A VM migrating in keeps the
        source's record until the migration hands it over; another host's VM is refused."""
        async with self._lock:
            old, rev = await self.load(spec.uuid)
            if self._migrating_in(old):
                return
            refuse_unless_owned(old, self.host, spec.name, "define")
            record = VmRecord(spec=without_secrets(spec), host=self.host, state=dom.state,
                              reason=dom.reason, migration=old.migration if old else None,
                              accelerator=dom.accelerator, revision=revision,
                              started_at=old.started_at if old else 0.0, updated=time.time())
            await self._store(record, rev)

    def _migrating_in(self, record: VmRecord | None) -> bool:
        return (record is not None and record.migration is not None
                and record.migration.target == self.host)

    async def refuse_foreign(self, uuid: str, name: str) -> None:
        """Before a create: Conflict when another host owns a VM of this uuid (unless it is
        migrating here)."""
        old, _ = await self.load(uuid)
        if not self._migrating_in(old):
            refuse_unless_owned(old, self.host, name, "define")

    @contextlib.asynccontextmanager
    async def owned(self, uuid: str, name: str, action: str, *,
                    stray_ok: bool = False) -> AsyncIterator[None]:
        """Run ``action`` (start, update, delete) only while this host owns the VM and no
        migration holds it; a migration cannot lock the VM until the action is done."""
        async with self._claims:
            record, _ = await self.load(uuid)
            refuse_unless_owned(record, self.host, name, action, stray_ok=stray_ok)
            yield

    async def lock(self, uuid: str, lock: MigrationLock) -> VmRecord:
        """Lock a stopped VM of this host for a migration (compare-and-set); returns the
        record as it was. Refused while it runs, is locked, or is not ours."""
        async with self._claims, self._lock:
            record, rev = await self.load(uuid)
            dom = await self.hv.domain(uuid)
            if record is None:
                raise Conflict(f"VM {dom.name} has no record in KV {subjects.KV_VMS} yet; "
                               "wait for the next reconciliation and migrate again")
            refuse_unless_owned(record, self.host, dom.name, "migrate")
            if dom.state not in STOPPED:
                raise Conflict(f"VM {dom.name} is {dom.state}: cold migration needs it shut "
                               "off; stop it first, or migrate with --shutdown")
            await self._store(msgspec.structs.replace(record, migration=lock), rev)
            return record

    async def unlock(self, uuid: str, job_id: str) -> None:
        """Release a migration's lock (after a roll back); a no-op once it is not held."""
        async with self._lock:
            record, rev = await self.load(uuid)
            if record is not None and record.migration and record.migration.job_id == job_id:
                await self._store(msgspec.structs.replace(record, migration=None,
                                                          updated=time.time()), rev)

    async def hand_over(self, uuid: str, job_id: str, target: str, disks: list[Disk],
                        accelerator: Literal["kvm", "tcg"], seed: str = "") -> None:
        """The commit of a migration: one compare-and-set makes ``target`` the owner (with
        its disk paths and the cloud-init seed it wrote) and releases the lock."""
        async with self._lock:
            record, rev = await self.load(uuid)
            if (record is None or record.host != self.host or record.migration is None
                    or record.migration.job_id != job_id):
                raise Conflict(f"the record of VM {uuid} is no longer locked by migration "
                               f"{job_id}; nothing was handed over")
            await self._store(msgspec.structs.replace(
                record, host=target, migration=None, state="shutoff", reason="migrated",
                accelerator=accelerator, started_at=0.0, updated=time.time(),
                spec=msgspec.structs.replace(record.spec, disks=disks, seed=seed)), rev)

    async def sync(self, dom: Domain, event: str, reason: str, *, missed: bool = False) -> None:
        """Record what the hypervisor says about one of our domains; publish the change."""
        if dom.spec is None:
            return
        async with self._lock:
            old, rev = await self.load(dom.uuid)
            if old is not None and old.host != self.host:  # a copy: its owner reports
                self._mine.discard(dom.uuid)
                if dom.state in RUNNING:
                    log.warning("VM %s runs here but belongs to host %s: stop it here",
                                dom.name, old.host)
                return
            was = old.state if old else None
            started_at = old.started_at if old else 0.0
            if dom.state in RUNNING and (was not in RUNNING or event == "started"):
                started_at = time.time()
            elif dom.state not in RUNNING:
                started_at = 0.0
            record = VmRecord(
                spec=old.spec if old else without_secrets(dom.spec), host=self.host,
                state=dom.state, migration=old.migration if old else None,
                reason=reason or dom.reason, accelerator=dom.accelerator,
                revision=old.revision if old else 1, started_at=started_at,
                updated=time.time())
            changed = old is None or was != dom.state or old.started_at != started_at
            self._mine.add(dom.uuid)
            if changed:
                await self._store(record, rev)
            if started_at:
                self._started[dom.uuid] = started_at
            else:
                self._started.pop(dom.uuid, None)
            if not event and not changed:
                return
            if missed:
                self.metrics.missed_events.inc()
                log.info("VM %s is %s (missed by events)", dom.name, dom.state)
            await self._publish(dom.uuid, dom.name, EVENT_STATE.get(event, dom.state),
                                event or "reconciled", reason or dom.reason, missed)

    async def gone(self, uuid: str, name: str, event: str, reason: str, *,
                    missed: bool = False) -> None:
        """The domain no longer exists: drop its record and say so, once."""
        async with self._lock:
            old, _ = await self.load(uuid)
            self._started.pop(uuid, None)
            if old is None or old.host != self.host:
                return
            await (await self._kv()).delete(uuid)
            self._mine.discard(uuid)
            if missed:
                self.metrics.missed_events.inc()
            await self._publish(uuid, name, "deleted", event or "reconciled", reason, missed)

    async def _publish(self, uuid: str, name: str, state: VmState, event: str, reason: str,
                       missed: bool) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
        await self.agent.publish("state", VmStateChanged(
            host=self.host, uuid=uuid, name=name, state=state, event=event, reason=reason,
            missed=missed), uuid)

    async def wait_state(self, uuid: str, states: frozenset[VmState], timeout: float) -> Domain:
        """Wait for one of ``states``, woken by events and re-checking every second."""
        deadline = time.monotonic() + timeout
        while True:
            changed = self._changed
            dom = await self.hv.domain(uuid)
            if dom.state in states:
                return dom
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Timeout(f"VM {dom.name} is still {dom.state} after {timeout:g} s")
            try:
                await asyncio.wait_for(changed.wait(), min(remaining, RECHECK_S))
            except TimeoutError:
                pass
