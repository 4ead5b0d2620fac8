"""Agent configuration: environment variables over an optional TOML file over defaults.

    PHYLLOME_HOST           host name of this machine (default: the hostname)
    PHYLLOME_NATS_URL       NATS server URL (default nats://127.0.0.1:4222)
    PHYLLOME_STATE_DIR      state directory (default /var/lib/phyllome as root,
                            else ~/.local/state/phyllome)
    PHYLLOME_LIBVIRT_URI    libvirt connection URI (default qemu:///system)
    PHYLLOME_SYSFS_ROOT     where sysfs is read and written (default /sys)
    PHYLLOME_<AGENT>_METRICS_PORT   /metrics port of one agent (defaults 9701..9704; 0 = any)
    PHYLLOME_REPLICAS       JetStream replicas of PHY_EVENTS and the KV buckets (1, or 3 in a
                            cluster of three or more servers)
    PHYLLOME_CONFIG         a TOML file with the same keys in lower case, and per-agent
                            tables (``[vm] metrics_port = 9802``)

    >>> load("vm", env={"PHYLLOME_HOST": "h1", "PHYLLOME_VM_METRICS_PORT": "0"}).metrics_port
    0
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec

from shared import subjects
from shared.errors import BadRequest

DEFAULT_METRICS_PORTS = {"hardware": 9701, "vm": 9702, "storage": 9703, "catalogue": 9704}
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"


class Config(msgspec.Struct, frozen=True, kw_only=True):
    agent: str
    host: str
    nats_url: str = DEFAULT_NATS_URL
    state_dir: str
    libvirt_uri: str = "qemu:///system"
    sysfs_root: str = "/sys"
    metrics_port: int
    metrics_host: str = "127.0.0.1"
    heartbeat_s: float = 5.0
    heartbeat_ttl_s: float = 20.0
    log_level: str = "INFO"
    nats_user: str = ""
    nats_password: str = ""
    nats_creds: str = ""
    nats_ca: str = ""
    accelerator: str = "auto"
    replicas: int = 1
    extra: dict[str, Any] = {}

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir)


def default_state_dir() -> str:
    if os.geteuid() == 0:
        return "/var/lib/phyllome"
    return str(Path.home() / ".local/state/phyllome")


def default_host() -> str:
    return socket.gethostname().split(".")[0] or "localhost"


_KEYS = ("host", "nats_url", "state_dir", "libvirt_uri", "sysfs_root", "log_level",
         "nats_user", "nats_password", "nats_creds", "nats_ca", "accelerator", "replicas")


def load(agent: str, env: Mapping[str, str] | None = None) -> Config:
    """The configuration of ``agent`` from ``env`` (default: ``os.environ``)."""
    env = os.environ if env is None else env
    subjects.service(agent)
    values: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    path = env.get("PHYLLOME_CONFIG")
    if path:
        import tomllib  # here: the CLI imports this module for its defaults alone

        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise BadRequest(f"config file {path}: {e}") from None
        values.update({k: v for k, v in data.items() if not isinstance(v, dict)})
        extra = dict(data.get(agent, {}))
        values.update({k: extra.pop(k) for k in list(extra) if k in Config.__struct_fields__})
    for key in _KEYS:
        if f"PHYLLOME_{key.upper()}" in env:
            values[key] = env[f"PHYLLOME_{key.upper()}"]
    port_env = f"PHYLLOME_{agent.upper()}_METRICS_PORT"
    if port_env in env:
        values["metrics_port"] = env[port_env]
    values.setdefault("host", default_host())
    values.setdefault("state_dir", default_state_dir())
    values.setdefault("metrics_port", DEFAULT_METRICS_PORTS[agent])
    try:
        cfg = msgspec.convert({**values, "agent": agent, "extra": extra}, Config, strict=False)
    except msgspec.ValidationError as e:
        raise BadRequest(f"configuration of {agent}: {e}") from None
    subjects.token(cfg.host, "PHYLLOME_HOST")
    if not 1 <= cfg.replicas <= 5:
        raise BadRequest(f"replicas = {cfg.replicas}: use 1 (one server) or 3 (a cluster of "
                         "three or more), at most 5")
    return cfg
