"""Waiting in tests: on an event where there is one, else polling with a deadline.

    await until("h2 to commit data", lambda: committed(bus), timeout=30)

A job is waited for as everyone else waits for one: ``shared.jobs.wait_job``.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

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
