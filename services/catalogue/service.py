"""Wiring of the catalogue agent: settings, the image store adapter, metrics, handlers.

    run_agent("catalogue", setup, ENDPOINTS)     # what __main__ does
"""

from __future__ import annotations

from services.catalogue.config import Settings
from services.catalogue.download import ImageStore
from services.catalogue.handlers import Handlers
from services.catalogue.metrics import CatalogueMetrics
from shared.agent import Agent
from shared.messages.catalogue import ENDPOINTS

__all__ = ["ENDPOINTS", "setup"]


async def setup(agent: Agent) -> Handlers:
    settings = Settings.from_config(agent.cfg)
    metrics = CatalogueMetrics(agent.registry)
    store = ImageStore(settings, agent.host, on_bytes=metrics.downloaded.inc)
    handlers = Handlers(agent, settings, store, metrics)
    await handlers.begin()
    return handlers
