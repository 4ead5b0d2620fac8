"""Wiring of the storage agent: its pools, handlers, the chunk subscription, background loop.

    run_agent("storage", setup, ENDPOINTS)     # what __main__.py does
"""

from __future__ import annotations

import asyncio

import msgspec

from services.storage.config import Settings
from services.storage.handlers import Handlers
from services.storage.metrics import StorageMetrics
from services.storage.snapshots import Snapshots
from services.storage.volumes import Pools
from shared.agent import Agent
from shared.messages.storage import ENDPOINTS

__all__ = ["ENDPOINTS", "setup"]


async def setup(agent: Agent) -> Handlers:
    settings = Settings.from_config(agent.cfg)
    pools = Pools(settings.pools, settings.import_dirs)
    handlers = Handlers(agent, pools, settings, StorageMetrics(agent.registry, pools),
                        Snapshots(pools))
    await handlers.begin()

    async def measure() -> None:
        rooms = await asyncio.to_thread(pools.rooms)
        agent.details = msgspec.structs.replace(agent.details, pools=rooms)

    agent.on_beat(measure)
    return handlers
