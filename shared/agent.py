"""What every agent is made of: config, metrics, the bus, a micro service, jobs, heartbeat.

An agent package supplies ``setup(agent) -> handlers`` and its ``ENDPOINTS``; this class does
the rest, the same way for all four. Each endpoint's verb is bound to the handlers' method of
that name; the handlers' lifecycle (``Lifecycle``: ``begin``/``close``) has names no verb may
take (``EndpointSpec`` refuses them), so an endpoint ``start`` cannot clash with it::

    agent = Agent("storage", load("storage"))
    await agent.start(setup, ENDPOINTS)   # connected, serving, heartbeat running
    await agent.stopping.wait()
    await agent.drain()

What an agent tells the cluster beside being alive is its part of ``agent.details`` (typed
``HeartbeatDetails``). Values that change (free memory, free pool space) are measured by a
hook that ``setup`` registers, called before every heartbeat::

    async def measure() -> None:
        agent.details = msgspec.structs.replace(agent.details, pools=await rooms())
    agent.on_beat(measure)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Protocol, runtime_checkable

from prometheus_client import CollectorRegistry

from shared import __version__, metrics, subjects
from shared.bus import Bus
from shared.codec import encode
from shared.config import Config
from shared.errors import Internal
from shared.jobs import JobRunner
from shared.messages import AgentStarted, AgentStopping, EndpointSpec, Event
from shared.messages.hosts import Heartbeat, HeartbeatDetails, Problem
from shared.messages.jobs import job_endpoints

Setup = Callable[["Agent"], Awaitable[Any]]
Measure = Callable[[], Awaitable[None]]


@runtime_checkable
class Lifecycle(Protocol):
    """Handlers that hold resources: ``setup`` awaits ``begin()`` before it returns them (scan,
    watchers, loops), ``Agent.drain`` awaits ``close()`` after the jobs have stopped. The
    names are in ``shared.messages.LIFECYCLE``, which no endpoint verb may use."""

    async def begin(self) -> None: ...

    async def close(self) -> None: ...


class Agent:
    """One running agent of kind ``name`` on host ``cfg.host``."""

    def __init__(self, name: str, cfg: Config, *, version: str = __version__) -> None:
        self.name = subjects.service(name)
        self.cfg = cfg
        self.host = cfg.host
        self.version = version
        self.log = logging.getLogger(f"phyllome.{name}")
        self.registry = CollectorRegistry()
        self.metrics = metrics.AgentMetrics(self.registry, name, host=cfg.host, version=version)
        self.jobs = JobRunner(self)
        self.details = HeartbeatDetails()
        self._on_beat: list[Measure] = []
        self.problems: list[Problem] = []  # set by the agent's own checks; sent in each beat
        self.stopping = asyncio.Event()
        self.started = time.time()
        self.metrics_url = ""
        self.handlers: Any = None
        self._bus: Bus | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def bus(self) -> Bus:
        if self._bus is None:
            raise RuntimeError("agent not started")
        return self._bus

    async def start(self, setup: Setup,
                    endpoints: Sequence[EndpointSpec[Any, Any]]) -> None:
        port = metrics.serve(self.registry, self.cfg.metrics_host, self.cfg.metrics_port)
        self.metrics_url = f"http://{self.cfg.metrics_host}:{port}/metrics"
        cfg = self.cfg
        self._bus = await Bus.connect(
            cfg.nats_url, name=f"{self.name}@{self.host}", host=self.host, metrics=self.metrics,
            user=cfg.nats_user, password=cfg.nats_password, creds=cfg.nats_creds, ca=cfg.nats_ca,
            replicas=cfg.replicas, kv_ttl_s=cfg.heartbeat_ttl_s)
        await self.bus.ensure_stream()
        self.handlers = await setup(self)
        missing = [s.verb for s in endpoints if not callable(getattr(self.handlers, s.verb, None))]
        if missing:
            raise Internal(f"the {self.name} handlers lack endpoints {', '.join(missing)}")
        bindings = [(s, getattr(self.handlers, s.verb)) for s in endpoints]
        bindings += [(s, getattr(self.jobs, s.verb)) for s in job_endpoints(self.name)]
        await self.bus.serve(self.name, self.version, bindings, metadata={
            "host": self.host, "metrics_url": self.metrics_url, "started": str(self.started)})
        await self.beat()
        self.spawn(self._heartbeat(), "heartbeat")
        await self.publish("agent.started", AgentStarted(
            host=self.host, agent=self.name, version=self.version, metrics_url=self.metrics_url))
        self.log.info("%s agent of host %s serving; metrics at %s", self.name, self.host,
                      self.metrics_url)

    async def publish(self, kind: str, event: Event, ident: str | None = None) -> bool:
        """Publish an event of this agent: ``phy.evt.<host>.<agent>.<kind>[.<ident>]``."""
        return await self.bus.publish_event(
            subjects.event(self.host, self.name, kind, ident), event)

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run a background loop for the agent's lifetime; it is cancelled at drain."""
        task = asyncio.create_task(coro, name=f"{self.name}-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            self.log.error("background task %s died: %r", task.get_name(), exc, exc_info=exc)

    def on_beat(self, measure: Measure) -> None:
        """Call ``measure`` before every heartbeat, so that what it sets in ``details`` (room
        that changes: memory, pool space) is as fresh as the beat that carries it."""
        self._on_beat.append(measure)

    async def beat(self) -> None:
        """Measure (the ``on_beat`` hooks), then write this agent's heartbeat into KV ``hosts``."""
        for measure in self._on_beat:
            try:
                await measure()
            except Exception as e:  # a hook's bug must not stop the beat: the host would look down
                self.log.warning("heartbeat details not refreshed, the last ones go out: %r", e,
                                 exc_info=e)
        hb = Heartbeat(host=self.host, agent=self.name, version=self.version,
                       started=self.started, time=time.time(), metrics_url=self.metrics_url,
                       details=self.details, problems=self.problems)
        try:
            kv = await self.bus.kv(subjects.KV_HOSTS)
            await kv.put(subjects.heartbeat_key(self.host, self.name), encode(hb))
        except Exception as e:  # the bus may be reconnecting; the next beat retries
            self.log.debug("heartbeat not written: %r", e)

    async def _heartbeat(self) -> None:
        while not self.stopping.is_set():
            try:
                await asyncio.wait_for(self.stopping.wait(), self.cfg.heartbeat_s)
            except TimeoutError:
                await self.beat()

    async def drain(self, reason: str = "stopping") -> None:
        """Stop taking work, cancel jobs (they roll back), say goodbye, close the bus."""
        self.stopping.set()
        if self._bus is None:
            return
        await self.bus.stop_serving()
        await self.jobs.cancel_all()
        if isinstance(self.handlers, Lifecycle):
            await self.handlers.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=10)
        await self.publish("agent.stopping", AgentStopping(
            host=self.host, agent=self.name, reason=reason))
        try:
            kv = await self.bus.kv(subjects.KV_HOSTS)
            await kv.delete(subjects.heartbeat_key(self.host, self.name))
        except Exception as e:
            self.log.debug("heartbeat not removed: %r", e)
        await self.bus.close()
        self.log.info("%s agent of host %s stopped", self.name, self.host)
