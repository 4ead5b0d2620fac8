"""The NATS configs of deploy/nats and the embedded server's cluster and leaf-node options."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from shared.config import load
from shared.errors import BadRequest
from shared.natsserver import LEAF_URL, NatsServer, binary, parse_urls

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy" / "nats"


@pytest.mark.integration
@pytest.mark.parametrize("name", ["cluster.conf", "leaf.conf"])
def test_deploy_configs_are_valid(name: str) -> None:
    result = subprocess.run([binary(), "-t", "-c", str(DEPLOY / name)], capture_output=True,
                            text=True, env={**os.environ, "PHYLLOME_HOST": "a"}, timeout=30)
    assert result.returncode == 0 and "is valid" in result.stdout + result.stderr, result


@pytest.mark.unit
def test_bad_route_and_replica_settings_are_refused_clearly() -> None:
    assert parse_urls(" nats://10.0.0.1:6222, ,nats://b:6222", "--cluster-routes") == [
        "nats://10.0.0.1:6222", "nats://b:6222"]
    with pytest.raises(BadRequest, match="'10.0.0.1' is not a URL like nats://10.0.0.2:6222"):
        parse_urls("10.0.0.1", "--cluster-routes")
    with pytest.raises(BadRequest, match="like nats-leaf://"):
        parse_urls("http://hub:7422", "--leaf-remotes", LEAF_URL)
    assert load("hardware", env={"PHYLLOME_HOST": "h", "PHYLLOME_REPLICAS": "3"}).replicas == 3
    for bad in ("three", "0", "7"):
        with pytest.raises(BadRequest, match="replicas"):
            load("vm", env={"PHYLLOME_HOST": "h", "PHYLLOME_REPLICAS": bad})


@pytest.mark.integration
def test_up_refuses_bad_routes_before_starting_anything(tmp_path: Path) -> None:
    env = {**os.environ, "PHYLLOME_STATE_DIR": str(tmp_path)}
    env.pop("PHYLLOME_NATS_URL", None)
    result = subprocess.run([sys.executable, "-m", "cli.main", "up", "--detach",
                             "--cluster-routes", "10.0.0.1:6222"], capture_output=True,
                            text=True, env=env, cwd=REPO, timeout=60)
    assert result.returncode == 1
    assert "--cluster-routes: '10.0.0.1:6222' is not a URL like nats://10.0.0.2:6222" in (
        result.stderr)
    assert not (tmp_path / "run" / "up.pid").exists()


@pytest.mark.integration
def test_leaf_host_joins_over_one_connection(tmp_path: Path) -> None:
    """`phyllome up --leaf-remotes`: a leaf server without JetStream; its agents' heartbeats,
    events and KV land in the hub's JetStream, and `phyllome hosts` on the hub lists it."""
    hub = NatsServer(tmp_path / "hub", port=-1, name="hub", leaf_listen="127.0.0.1:-1")
    hub.start()
    state = tmp_path / "edge"
    env = {**os.environ, "PHYLLOME_STATE_DIR": str(state), "PHYLLOME_HOST": "edge",
           "PHYLLOME_STORAGE_METRICS_PORT": "0", "COLUMNS": "200"}
    env.pop("PHYLLOME_NATS_URL", None)
    try:
        leaf_port = re.search(r"Listening for leafnode connections on [^:]+:(\d+)",
                              hub.log_path.read_text())
        assert leaf_port, hub.log_path.read_text()
        up = phyllome("up", "--detach", "--no-demo", "--listen", "127.0.0.1:-1", "--agents",
                      "storage", "--leaf-remotes",
                      f"nats-leaf://127.0.0.1:{leaf_port.group(1)}", env=env)
        try:
            assert up.returncode == 0, up.stdout + up.stderr
            assert "jetstream" not in (state / "nats" / "nats-server.conf").read_text()
            hosts = phyllome("hosts", "--json", env={**env, "PHYLLOME_NATS_URL": hub.url})
            assert hosts.returncode == 0, hosts.stderr
            [edge] = json.loads(hosts.stdout)
            assert edge["host"] == "edge" and edge["state"] == "up"
            assert edge["agents"] == ["storage"] and "default" in edge["pools"]
        finally:
            down = phyllome("down", env=env)
            assert down.returncode == 0, down.stdout + down.stderr
    finally:
        hub.stop()


def phyllome(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=150)
