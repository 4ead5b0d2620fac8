"""One NATS connection per CLI command: ``vm create --host auto`` places and creates over one.

The server's monitoring endpoint lists closed connections with their client names
(``/connz?state=closed``); the CLI names its connection ``phyllome-cli``.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

from shared.natsserver import NatsServer
from tests.cluster.test_migration import pair

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cli_connections(port: int) -> int:
    url = f"http://127.0.0.1:{port}/connz?state=closed&limit=1000"
    with urllib.request.urlopen(url, timeout=5) as resp:
        return sum(1 for c in json.load(resp)["connections"] if c.get("name") == "phyllome-cli")


async def test_vm_create_with_auto_placement_opens_one_connection(tmp_path: Path) -> None:
    monitor = _free_port()
    server = NatsServer(tmp_path / "nats", port=-1, extra_conf=f"http: 127.0.0.1:{monitor}\n")
    server.start()
    try:
        async with pair(server, tmp_path / "hosts"):
            env = {**os.environ, "PHYLLOME_NATS_URL": server.url, "COLUMNS": "200"}
            done = await asyncio.to_thread(
                subprocess.run, [sys.executable, "-m", "cli.main", "vm", "create", "one",
                                 "--host", "auto", "--memory", "64M", "--firmware", "bios",
                                 "--display", "none", "--json"],
                cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stdout + done.stderr
            assert "placed on " in done.stderr
            assert _cli_connections(monitor) == 1
    finally:
        server.stop()
