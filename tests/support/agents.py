"""Agents under test: in this process (fast, debuggable) or as a real child process.

    async with agent_in_process("storage", nats_server.url, tmp_path, host="h1") as agent:
        reply = await agent.bus.call("h1", storage_api.POOLS, Empty())

    proc = AgentProcess("vm", nats_server.url, tmp_path, host="h1")
    await proc.start()        # returns once the agent answers $SRV.PING
    proc.kill()               # SIGKILL, as a crash would
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec

from shared import subjects
from shared.agent import Agent
from shared.config import Config, load

REPO = Path(__file__).resolve().parents[2]


def agent_env(name: str, nats_url: str, state_dir: Path, host: str = "h1",
              **extra: str) -> dict[str, str]:
    return {
        "PHYLLOME_HOST": host,
        "PHYLLOME_NATS_URL": nats_url,
        "PHYLLOME_STATE_DIR": str(state_dir),
        f"PHYLLOME_{name.upper()}_METRICS_PORT": "0",
        **extra,
    }


def agent_config(name: str, nats_url: str, state_dir: Path, host: str = "h1",
                 **overrides: Any) -> Config:
    cfg = load(name, env=agent_env(name, nats_url, state_dir, host))
    return msgspec.structs.replace(cfg, heartbeat_s=0.5, **overrides)


@contextlib.asynccontextmanager
async def agent_in_process(name: str, nats_url: str, state_dir: Path, host: str = "h1",
                           **overrides: Any) -> AsyncIterator[Agent]:
    """Start the real agent ``name`` inside the test's event loop; drain it afterwards."""
    import importlib

    service = importlib.import_module(f"services.{name}.service")
    agent = Agent(name, agent_config(name, nats_url, state_dir, host, **overrides))
    try:
        await agent.start(service.setup, service.ENDPOINTS)
        yield agent
    finally:
        await agent.drain()


async def wait_for_ping(nats_url: str, name: str, host: str, timeout: float = 20.0,
                        proc: subprocess.Popen[bytes] | None = None) -> dict[str, Any]:
    """Poll ``$SRV.PING.phyllome-<name>`` until the agent of ``host`` answers."""
    import json

    import nats

    nc = await nats.connect(nats_url, max_reconnect_attempts=-1, connect_timeout=2)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{name} agent exited with {proc.returncode}")
            inbox = nc.new_inbox()
            sub = await nc.subscribe(inbox)
            await nc.publish(f"$SRV.PING.{subjects.micro_name(name)}", b"", reply=inbox)
            try:
                while True:
                    msg = await sub.next_msg(timeout=0.2)
                    ping: dict[str, Any] = json.loads(msg.data)
                    if ping.get("metadata", {}).get("host") == host:
                        return ping
            except Exception:
                pass
            finally:
                await sub.unsubscribe()
        raise TimeoutError(f"{name} agent of {host} did not answer $SRV.PING in {timeout} s")
    finally:
        await nc.close()


class AgentProcess:
    """``python -m services.<name>`` as a child process, its log in ``state_dir``."""

    def __init__(self, name: str, nats_url: str, state_dir: Path, host: str = "h1",
                 **env: str) -> None:
        self.name, self.nats_url, self.state_dir, self.host = name, nats_url, state_dir, host
        self.env = {**os.environ, **agent_env(name, nats_url, state_dir, host), **env}
        self.log_path = state_dir / f"{name}-{host}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self, wait: bool = True) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", f"services.{self.name}"], cwd=REPO, env=self.env,
                stdout=log, stderr=log, start_new_session=True)
        if wait:
            await wait_for_ping(self.nats_url, self.name, self.host, proc=self.proc)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    async def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait for the drain; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while self.proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if self.proc.poll() is None:
                self.kill()
        return self.proc.returncode
