"""A JobRunner needs only a publisher (host, name, metrics, publish), not a whole agent."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from shared.errors import Conflict
from shared.jobs import Job, JobRunner
from shared.messages import Event
from shared.messages.jobs import JobFinished, JobProgress
from shared.metrics import AgentMetrics


class Publisher:
    """Records what the runner publishes."""

    def __init__(self) -> None:
        self.host, self.name = "h1", "storage"
        self.registry = CollectorRegistry()
        self.metrics = AgentMetrics(self.registry, "storage", host="h1", version="1")
        self.events: list[tuple[str, Event, str | None]] = []

    async def publish(self, kind: str, event: Event, ident: str | None = None) -> bool:
        self.events.append((kind, event, ident))
        return True


async def test_jobs_run_report_and_count_through_the_publisher() -> None:
    pub = Publisher()
    runner = JobRunner(pub)

    async def work(job: Job) -> dict[str, object]:
        await job.progress(1, 1, "copied")
        return {"path": "/p/d"}

    async def broken(job: Job) -> dict[str, object]:
        raise Conflict("the volume is in use")

    ok = runner.start("clone", work)
    assert ok.subject == f"phy.evt.h1.storage.job.{ok.job_id}"
    assert (await runner.wait(ok.job_id)).result == {"path": "/p/d"}
    failed = runner.start("clone", broken)
    status = await runner.wait(failed.job_id)
    assert (status.state, status.error_kind) == ("failed", "conflict")
    kinds = [(kind, type(e), ident) for kind, e, ident in pub.events]
    assert kinds == [("job", JobProgress, ok.job_id), ("job", JobFinished, ok.job_id),
                     ("job", JobFinished, failed.job_id)]
    assert pub.registry.get_sample_value(
        "phyllome_storage_jobs_total", {"kind": "clone", "state": "failed"}) == 1.0
