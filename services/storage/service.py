"""Wiring of the storage agent: builds its adapter and handlers for `shared.agent.Agent`."""

from __future__ import annotations

from shared.agent import Agent
from shared.messages.storage import ENDPOINTS

__all__ = ["ENDPOINTS", "setup"]


class Handlers:
    """The storage endpoints (none yet beyond the common job endpoints)."""


async def setup(agent: Agent) -> Handlers:
    return Handlers()
