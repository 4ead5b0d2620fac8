"""Wiring of the hardware agent: builds its adapter and handlers for `shared.agent.Agent`."""

from __future__ import annotations

from shared.agent import Agent
from shared.messages.hardware import ENDPOINTS

__all__ = ["ENDPOINTS", "setup"]


class Handlers:
    """The hardware endpoints (none yet beyond the common job endpoints)."""


async def setup(agent: Agent) -> Handlers:
    return Handlers()
