"""Long work as jobs: the request returns a job id at once; progress and outcome are events.

Every agent that runs jobs answers the ``JOB_ENDPOINTS`` (``jobs``, ``job``, ``cancel``).
Events: ``phy.evt.<host>.<service>.job.<job_id>``.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from shared.messages import Empty, EndpointSpec, Event

JobState = Literal["running", "succeeded", "failed", "cancelled"]


class JobAccepted(msgspec.Struct, frozen=True, kw_only=True, tag="job.accepted.v1"):
    job_id: str
    kind: str
    subject: str  # where its events go


class JobRef(msgspec.Struct, frozen=True, kw_only=True, tag="job.ref.v1"):
    job_id: str


class JobStatus(msgspec.Struct, frozen=True, kw_only=True, tag="job.status.v1"):
    job_id: str
    kind: str
    state: JobState
    done: int = 0
    total: int = 0
    rate: float = 0.0
    message: str = ""
    error_kind: str = ""
    result: dict[str, object] = {}
    started: float = 0.0
    finished: float = 0.0


class JobList(msgspec.Struct, frozen=True, kw_only=True, tag="job.list.v1"):
    jobs: list[JobStatus]


class JobProgress(Event, frozen=True, kw_only=True, tag="job.progress.v1"):
    job_id: str
    kind: str
    done: int
    total: int
    rate: float = 0.0
    eta_s: float | None = None
    message: str = ""


class JobFinished(Event, frozen=True, kw_only=True, tag="job.finished.v1"):
    job_id: str
    kind: str
    state: JobState
    message: str = ""
    error_kind: str = ""
    result: dict[str, object] = {}


def job_endpoints(service: str) -> tuple[EndpointSpec[Empty, JobList],
                                         EndpointSpec[JobRef, JobStatus],
                                         EndpointSpec[JobRef, JobStatus]]:
    """The ``jobs``, ``job`` and ``cancel`` endpoints every agent that runs jobs answers."""
    return (
        EndpointSpec(service, "jobs", Empty, JobList, "Jobs this agent ran since it started."),
        EndpointSpec(service, "job", JobRef, JobStatus, "One job's state and progress."),
        EndpointSpec(service, "cancel", JobRef, JobStatus,
                     "Ask a running job to stop; it rolls back."),
    )
