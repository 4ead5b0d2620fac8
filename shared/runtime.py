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


def run_loop(main: Coroutine[Any, Any, T], *, uv: bool) -> T:
    """Run a long-lived process's ``main`` on uvloop (libuv's event loop, ``uv``) or on
    asyncio's own. uvloop's turns of the loop cost a fraction of asyncio's: the web gateway,
    which relays a console's key presses and serves the API, runs on it (``docs/benchmarks.md``,
    web console round trip). The agents keep asyncio's, measured and tested on it:

    - the storage agent gathers a volume transfer's chunks around asyncio reading a socket
      once a turn (``shared/natsfast.py``, ``receive_big``); under uvloop most reads of a
      chunk land before the parser knows it, two more copies each, 7% slower;
    - the vm agent's serial consoles write to a pty through a write pipe transport, and
      uvloop's reads the fd it writes to (to notice a closed pipe), taking the guest's
      output from the console's reader;
    - the others gain nothing a user would see.

    Threads that make a loop of their own (libvirt's) keep asyncio's; so does the CLI."""
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


def run_agent(name: str, setup: Setup, endpoints: Sequence[EndpointSpec[Any, Any]]) -> None:
    try:
        cfg = load(name)
    except PhyError as e:
        print(f"phyllome-{name}: {e.message}", file=sys.stderr)
        sys.exit(2)
    setup_logging(cfg.log_level, agent=name, host=cfg.host)
    started = time.monotonic()
    try:
        run_loop(serve(name, cfg, setup, endpoints), uv=False)  # see run_loop
    except PhyError as e:
        logging.getLogger(f"phyllome.{name}").error("cannot run: %s", e.message)
        sys.exit(1)
    logging.getLogger(f"phyllome.{name}").info("exited after %.1f s", time.monotonic() - started)
