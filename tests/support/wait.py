"""Waiting in tests: on an event where there is one, else polling with a deadline.

    await until("h2 to commit data", lambda: committed(bus), timeout=30)
    outcome = await job_finished(bus, "h1", "storage", accepted.job_id)
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec

from shared import subjects
from shared.bus import Bus
from shared.messages.jobs import JobFinished

T = TypeVar("T")


async def until(what: str, check: Callable[[], T | Awaitable[T]], timeout: float = 60.0,
                interval: float = 0.05) -> T:
    """Call ``check`` (sync or async) until it returns something truthy; fail at the deadline
    saying what did not happen."""
    deadline = time.monotonic() + timeout
    while True:
        value: Any = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(interval)


async def job_finished(bus: Bus, host: str, svc: str, job_id: str,
                       timeout: float = 90.0) -> JobFinished:
    """The job's outcome event, read from JetStream (so a job that ended before this call
    is seen too)."""
    subject = subjects.event(host, svc, "job", job_id)

    async def first() -> JobFinished:
        stream = bus.events(subject, follow=True)
        async with contextlib.aclosing(stream):
            async for _subject, _time, data in stream:
                if b'"job.finished.v1"' in data:
                    return msgspec.json.decode(data, type=JobFinished)
        raise AssertionError(f"the events of job {job_id} ended without an outcome")

    try:
        return await asyncio.wait_for(first(), timeout)
    except TimeoutError:
        raise AssertionError(f"job {job_id} did not finish within {timeout} s") from None
