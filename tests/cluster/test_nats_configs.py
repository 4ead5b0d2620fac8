"""The NATS configs of deploy/nats and the embedded server's cluster and leaf-node options."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from shared.config import load
from shared.errors import BadRequest
from shared.natsserver import LEAF_URL, binary, parse_urls

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "nats"


@pytest.mark.unit
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
