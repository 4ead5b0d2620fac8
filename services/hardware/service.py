"""Wiring of the hardware agent: the sysfs adapter, inventory, operations, handlers, and
the two things it does for its host: its resources in the heartbeat, the host watch.

    run_agent("hardware", setup, ENDPOINTS)     # what __main__.py does
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec

from services.hardware import hostwatch
from services.hardware.config import Settings
from services.hardware.handlers import Handlers
from services.hardware.inventory import Inventory
from services.hardware.metrics import HardwareMetrics
from services.hardware.operations import Operations
from services.hardware.resources import host_resources
from services.hardware.sysfs import Sysfs
from shared.agent import Agent
from shared.messages.hardware import ENDPOINTS

__all__ = ["ENDPOINTS", "setup"]


async def setup(agent: Agent) -> Handlers:
    settings = Settings.from_config(agent.cfg)
    fs = Sysfs(settings.sysfs_root, proc_root=settings.proc_root, root_dev=settings.root_dev,
               write_timeout_s=settings.sysfs_write_timeout_s)
    inventory = Inventory(fs)
    ops = Operations(fs, inventory, Path(settings.state_dir))
    metrics = HardwareMetrics(agent.registry)
    handlers = Handlers(agent, fs, inventory, ops, settings, metrics)
    metrics.watch(inventory.devices, lambda: handlers.last_caps)
    await handlers.begin()

    async def measure() -> None:
        resources = await asyncio.to_thread(host_resources, inventory.devices())
        agent.details = msgspec.structs.replace(agent.details, resources=resources,
                                                stuck_writes=dict(fs.stuck))

    agent.on_beat(measure)
    agent.spawn(hostwatch.watch(agent), "host-watch")
    return handlers
