"""Jobs: long work that answers at once with a job id, reports progress as events, can be
cancelled, and never reports success for half-done work.

    async def work(job: Job) -> dict[str, object]:
        for i in range(10):
            await job.progress(i, 10, "copying")
        return {"path": "/pool/disk.raw"}

    accepted = agent.jobs.start("clone", work)      # JobAccepted(job_id=..., subject=...)

Cancellation is asyncio cancellation of the work task: the work cleans up in ``finally``.
``key`` makes two starts of the same work share one job (two pulls of one image).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from shared import subjects
from shared.errors import Cancelled, NotFound, PhyError
from shared.messages import Empty, Event, new_id
from shared.messages.jobs import (
    JobAccepted,
    JobFinished,
    JobList,
    JobProgress,
    JobRef,
    JobState,
    JobStatus,
)
from shared.metrics import AgentMetrics

log = logging.getLogger("phyllome.jobs")

Work = Callable[["Job"], Awaitable[dict[str, object]]]
PROGRESS_INTERVAL_S = 0.25
KEEP_FINISHED = 500


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

    async def progress(self, done: int, total: int, message: str = "") -> None:
        """Record progress; publishes an event at most every 0.25 s (and at the end)."""
        self.done, self.total = done, total
        if message:
            self.message = message
        elapsed = time.monotonic() - self._started_mono
        self.rate = done / elapsed if elapsed > 0 else 0.0
        now = time.monotonic()
        if now - self._last_report < PROGRESS_INTERVAL_S and done < total:
            return
        self._last_report = now
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
