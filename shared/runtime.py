"""Process runtime of an agent: structured logs, SIGTERM/SIGINT drain, exit codes.

``services/<x>/__main__.py`` is one line::

    run_agent("storage", service.setup, service.ENDPOINTS)
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
import time
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

import uvloop

from shared.agent import Agent, Setup
from shared.config import Config, load
from shared.errors import PhyError
from shared.messages import EndpointSpec

T = TypeVar("T")


def run_loop(main: Coroutine[Any, Any, T], *, uv: bool = True) -> T:
    """Run a long-lived process's ``main`` on uvloop (libuv's event loop), or on asyncio's
    own with ``uv=False``. uvloop's turns of the loop cost a fraction of asyncio's: a
    console's key press crosses the web gateway and the vm agent as a few turns each
    (``docs/benchmarks.md``, web console round trip). asyncio's reads one socket once a
    turn, which a volume transfer's chunks are gathered around (``shared/natsfast.py``,
    ``receive_big``: under uvloop most reads of a chunk land before the parser knows it,
    and cost two more copies); the storage agent keeps it. Threads that make a loop of
    their own (libvirt's) keep asyncio's; so does the CLI, which lives a fraction of a
    second."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop if uv else None) as runner:
        return runner.run(main)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (+ exception)."""

    def __init__(self, **fields: str) -> None:
        super().__init__()
        self.fields = fields

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 3), "level": record.levelname.lower(),
               "logger": record.name, "msg": record.getMessage(), **self.fields}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(level: str, **fields: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(**fields))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("nats").setLevel(logging.CRITICAL)


async def serve(name: str, cfg: Config, setup: Setup,
                endpoints: Sequence[EndpointSpec[Any, Any]]) -> None:
    """Run one agent until SIGTERM/SIGINT, then drain."""
    agent = Agent(name, cfg)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, agent.stopping.set)
    try:
        await agent.start(setup, endpoints)
        await agent.stopping.wait()
    finally:
        await agent.drain()


def run_agent(name: str, setup: Setup, endpoints: Sequence[EndpointSpec[Any, Any]], *,
              uv: bool = True) -> None:
    """Run agent ``name`` until SIGTERM/SIGINT (``uv``: see ``run_loop``)."""
    try:
        cfg = load(name)
    except PhyError as e:
        print(f"phyllome-{name}: {e.message}", file=sys.stderr)
        sys.exit(2)
    setup_logging(cfg.log_level, agent=name, host=cfg.host)
    started = time.monotonic()
    try:
        run_loop(serve(name, cfg, setup, endpoints), uv=uv)
    except PhyError as e:
        logging.getLogger(f"phyllome.{name}").error("cannot run: %s", e.message)
        sys.exit(1)
    logging.getLogger(f"phyllome.{name}").info("exited after %.1f s", time.monotonic() - started)
