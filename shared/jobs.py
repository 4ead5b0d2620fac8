"""Jobs: long work that answers at once with a job id, reports progress as events, can be
cancelled, and never reports success for half-done work.

    async def work(job: Job) -> dict[str, object]:
        for i in range(10):
            await job.progress(i, 10, "copying")
        return {"path": "/pool/disk.raw"}

    accepted = agent.jobs.start("clone", work)      # JobAccepted(job_id=..., subject=...)

Cancellation is asyncio cancellation of the work task: the work cleans up in ``finally``.
``key`` makes two starts of the same work share one job (two pulls of one image).

Whoever waits for a job — another agent, the CLI, a test — follows its events with
``wait_job``, on any host::

    outcome = await wait_job(bus, "h1", "storage", accepted, timeout=3600)  # JobFinished
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

import msgspec
import nats.errors
from nats.js.api import ConsumerConfig, DeliverPolicy

from shared import subjects
from shared.bus import Bus
from shared.errors import BackendError, Cancelled, NotFound, PhyError, Timeout
from shared.messages import Empty, Event, new_id
from shared.messages.jobs import (
    JobAccepted,
    JobFinished,
    JobList,
    JobProgress,
    JobRef,
    JobState,
    JobStatus,
    job_endpoints,
)
from shared.metrics import AgentMetrics

log = logging.getLogger("phyllome.jobs")

Work = Callable[["Job"], Awaitable[dict[str, object]]]
PROGRESS_INTERVAL_S = 0.25
KEEP_FINISHED = 500
STATUS_TIMEOUT_S = 10.0
RECHECK_S = 5.0  # wait_job asks the job's status again after this long without an event
_JOB_EVENT = msgspec.json.Decoder(JobProgress | JobFinished)


class Publisher(Protocol):
    """What a JobRunner needs of its agent: who it is, where jobs are counted, and a way to
    publish their events (``shared.agent.Agent`` is one; a unit test can pass a small fake)."""

    @property
    def host(self) -> str: ...

    @property
    def name(self) -> str: ...

    @property
    def metrics(self) -> AgentMetrics: ...

    async def publish(self, kind: str, event: Event, ident: str | None = None) -> bool: ...


class Job:
    """One running job; the work function reports through it."""

    def __init__(self, runner: JobRunner, kind: str) -> None:
        self.runner = runner
        self.id = new_id()
        self.kind = kind
        self.state: JobState = "running"
        self.done = 0
        self.total = 0
        self.rate = 0.0
        self.message = ""
        self.error_kind = ""
        self.result: dict[str, object] = {}
        self.started = time.time()
        self._started_mono = time.monotonic()  # rates survive a wall-clock jump
        self.finished = 0.0
        self.task: asyncio.Task[None] | None = None
        self.ended = asyncio.Event()  # set once the work has ended, before the event goes out
        self._last_report = 0.0

    @property
    def subject(self) -> str:
        return self.runner.subject(self.id)

    async def progress(self, done: int, total: int, message: str = "", *,
                       now: bool = False) -> None:
        """Record progress; publishes an event at most every 0.25 s (and at the end), or at
        once with ``now`` (a step that whoever follows the job must see)."""
        self.done, self.total = done, total
        if message:
            self.message = message
        elapsed = time.monotonic() - self._started_mono
        self.rate = done / elapsed if elapsed > 0 else 0.0
        clock = time.monotonic()
        if not now and clock - self._last_report < PROGRESS_INTERVAL_S and done < total:
            return
        self._last_report = clock
        eta = (total - done) / self.rate if self.rate > 0 and total >= done else None
        await self.runner.agent.publish("job", JobProgress(
            host=self.runner.agent.host, job_id=self.id, kind=self.kind, done=done, total=total,
            rate=self.rate, eta_s=eta, message=self.message), self.id)

    def status(self) -> JobStatus:
        return JobStatus(job_id=self.id, kind=self.kind, state=self.state, done=self.done,
                         total=self.total, rate=self.rate, message=self.message,
                         error_kind=self.error_kind, result=self.result, started=self.started,
                         finished=self.finished)


class JobRunner:
    """The jobs of one agent; also the handlers of the ``jobs``/``job``/``cancel`` endpoints."""

    def __init__(self, agent: Publisher) -> None:
        self.agent = agent
        self._jobs: dict[str, Job] = {}
        self._by_key: dict[str, Job] = {}

    def subject(self, job_id: str) -> str:
        return subjects.event(self.agent.host, self.agent.name, "job", job_id)

    def running(self, key: str) -> str:
        """The id of the running job started with ``key``, or "" when none runs."""
        job = self._by_key.get(key)
        return job.id if job is not None and job.state == "running" else ""

    def start(self, kind: str, work: Work, *, key: str | None = None) -> JobAccepted:
        if key is not None and (same := self._by_key.get(key)) and same.state == "running":
            return JobAccepted(job_id=same.id, kind=kind, subject=same.subject)
        job = Job(self, kind)
        self._jobs[job.id] = job
        if key is not None:
            self._by_key[key] = job
        job.task = asyncio.create_task(self._run(job, work), name=f"job-{kind}-{job.id}")
        self.agent.metrics.jobs_running.inc()
        return JobAccepted(job_id=job.id, kind=kind, subject=job.subject)

    async def _run(self, job: Job, work: Work) -> None:
        try:
            job.result = await work(job)
            job.state = "succeeded"
        except asyncio.CancelledError:
            job.state, job.error_kind = "cancelled", Cancelled.kind
            job.message = job.message or "cancelled"
        except PhyError as e:
            job.state, job.error_kind, job.message = "failed", e.kind, str(e)  # with its origin
        except Exception as e:
            log.exception("job %s (%s) failed unexpectedly", job.id, job.kind)
            job.state, job.error_kind, job.message = "failed", "internal", repr(e)
        await self._finish(job)

    async def _finish(self, job: Job) -> None:
        """The work has ended (and rolled back if it had to): say so, then tell everyone."""
        job.finished = time.time()
        job.ended.set()
        self.agent.metrics.jobs_running.dec()
        self.agent.metrics.jobs.labels(kind=job.kind, state=job.state).inc()
        await self.agent.publish("job", JobFinished(
            host=self.agent.host, job_id=job.id, kind=job.kind, state=job.state,
            message=job.message, error_kind=job.error_kind, result=job.result), job.id)
        self._forget_old()

    def _forget_old(self) -> None:
        finished = [j for j in self._jobs.values() if j.state != "running"]
        for old in finished[: max(0, len(finished) - KEEP_FINISHED)]:
            self._jobs.pop(old.id, None)
        self._by_key = {k: j for k, j in self._by_key.items() if j.id in self._jobs}

    def get(self, job_id: str) -> Job:
        try:
            return self._jobs[job_id]
        except KeyError:
            raise NotFound(f"no job {job_id!r}: it never ran here, or it finished long "
                           f"ago (the last {KEEP_FINISHED} are kept)") from None

    async def wait(self, job_id: str) -> JobStatus:
        """Wait until the job has finished (for callers in the same process)."""
        job = self.get(job_id)
        if job.task is not None:
            await asyncio.shield(job.task)
        return job.status()

    async def cancel_all(self) -> None:
        running = [j for j in self._jobs.values() if j.task and not j.task.done()]
        for job in running:
            await self._stop(job)

    async def _stop(self, job: Job) -> None:
        """Cancel a job's work and wait until it has rolled back (not for the event)."""
        if job.task is None or job.task.done():
            return
        job.task.cancel()
        ended = asyncio.ensure_future(job.ended.wait())
        await asyncio.wait([job.task, ended], timeout=30, return_when=asyncio.FIRST_COMPLETED)
        ended.cancel()
        if job.state == "running" and job.task.done():  # cancelled before its work began
            job.state, job.error_kind, job.message = "cancelled", Cancelled.kind, "cancelled"
            await self._finish(job)

    # -- endpoints --------------------------------------------------------------------------

    async def jobs(self, req: Empty) -> JobList:
        return JobList(jobs=[j.status() for j in self._jobs.values()])

    async def job(self, req: JobRef) -> JobStatus:
        return self.get(req.job_id).status()

    async def cancel(self, req: JobRef) -> JobStatus:
        job = self.get(req.job_id)
        await self._stop(job)
        return job.status()


async def wait_job(bus: Bus, host: str, service: str, job: str | JobAccepted, *,
                   timeout: float,
                   on_progress: Callable[[JobProgress], Awaitable[None]] | None = None,
                   ) -> JobFinished:
    """Follow a job of ``service`` on ``host`` until it ends; returns its outcome, whatever
    it is (the caller decides what a failure means to it).

    Subscribes to the job's events first (replayed from JetStream from the job's first one),
    then asks the job's status once, so a job that ended before the subscription, or whose
    last events were not stored, is seen to end too. After ``RECHECK_S`` without an event the
    status is asked again, so a job whose agent died ends the wait with that agent's error
    instead of at the deadline: ``Unavailable``, or ``NotFound`` when a restarted agent does
    not know the job and no outcome event came within ``RECHECK_S`` (an agent that settles
    its crashed jobs at start publishes their outcomes).
    Raises ``Timeout`` when the job has not ended within ``timeout`` seconds.

    The subscription is read with timeouts in this task, never from a task that is cancelled:
    nats-py can swallow a cancellation that lands while a subscription is being made.
    """
    job_id = job.job_id if isinstance(job, JobAccepted) else job
    _jobs, status_spec, _cancel = job_endpoints(service)
    deadline = time.monotonic() + timeout
    sub = await bus.js.subscribe(
        subjects.event(host, service, "job", job_id), stream=subjects.STREAM,
        ordered_consumer=True, config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL))
    try:
        ask, unknown = True, False
        while True:
            if ask:
                try:
                    status = await bus.call(host, status_spec, JobRef(job_id=job_id),
                                            timeout=STATUS_TIMEOUT_S)
                except NotFound:
                    if unknown:
                        raise
                    unknown = True  # a restarted agent may still publish the outcome
                else:
                    if status.state != "running":
                        return JobFinished(host=host, job_id=job_id, kind=status.kind,
                                           state=status.state, message=status.message,
                                           error_kind=status.error_kind, result=status.result)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Timeout(f"{service} job {job_id} on {host} did not finish within "
                              f"{timeout:g} s (it may still be running there; cancel it if "
                              "it is stuck)")
            try:
                msg = await sub.next_msg(timeout=min(remaining, RECHECK_S))
            except nats.errors.TimeoutError:
                ask = True
                continue
            ask = False
            try:
                event = _JOB_EVENT.decode(msg.data)
            except msgspec.MsgspecError:  # an event kind newer than this code
                continue
            if isinstance(event, JobFinished):
                return event
            if on_progress is not None:
                await on_progress(event)
    finally:
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()


def succeeded(outcome: JobFinished) -> JobFinished:
    """The outcome of a job that the caller's own work needs; ``BackendError`` unless it
    succeeded (a failed clone under a VM create fails the create)."""
    if outcome.state != "succeeded":
        raise BackendError(f"{outcome.kind} job {outcome.job_id} on {outcome.host} "
                           f"{outcome.state}: {outcome.message}")
    return outcome
