"""A real nats-server per test, on a free port, with JetStream in ``tmp_path``.

    async def test_x(nats_server):
        bus = await Bus.connect(nats_server.url, name="t", host="h1", give_up_after=5)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.natsserver import NatsServer


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "nats", port=-1)
    server.start()
    yield server
    server.stop()
