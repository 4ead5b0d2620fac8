"""Settings of the web gateway, from the environment (the agents' names where they share one).

    PHYLLOME_WEB_LISTEN     where the HTTP server listens (default 127.0.0.1:9700;
                            ``[::1]:9700``, ``0.0.0.0:443``)
    PHYLLOME_WEB_CERT       serve HTTPS with this certificate (PEM) and ...
    PHYLLOME_WEB_KEY        ... this key (``phyllome up --secure`` passes the host's own)
    PHYLLOME_NOVNC_DIR      noVNC's files (default /usr/share/novnc, Debian's ``novnc``)
    PHYLLOME_HOST, PHYLLOME_NATS_URL, PHYLLOME_NATS_USER / _PASSWORD / _CREDS / _CA,
    PHYLLOME_LOG_LEVEL      as for the agents (shared/config.py)

    >>> load({"PHYLLOME_HOST": "h1", "PHYLLOME_WEB_LISTEN": "[::1]:8080"}).listen_port
    8080
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import msgspec

from shared import subjects
from shared.config import DEFAULT_NATS_URL, default_host
from shared.errors import BadRequest

DEFAULT_LISTEN = "127.0.0.1:9700"


class WebConfig(msgspec.Struct, frozen=True, kw_only=True):
    host: str
    listen_host: str = "127.0.0.1"
    listen_port: int = 9700
    cert: str = ""
    key: str = ""
    nats_url: str = DEFAULT_NATS_URL
    nats_user: str = ""
    nats_password: str = ""
    nats_creds: str = ""
    nats_ca: str = ""
    log_level: str = "INFO"
    novnc_dir: str = "/usr/share/novnc"
    token_cache_s: float = 2.0  # how long a looked-up token is trusted before KV is asked again
    backoff_free: int = 3  # bad tokens an address may send before it has to wait
    backoff_base_s: float = 1.0  # the first wait; it doubles with each further bad token
    backoff_max_s: float = 60.0

    @property
    def scheme(self) -> str:
        return "https" if self.cert else "http"


def parse_listen(text: str) -> tuple[str, int]:
    """``host:port`` (IPv6 in brackets) -> (host, port); an empty host means 127.0.0.1."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise BadRequest(f"PHYLLOME_WEB_LISTEN={text!r}: use HOST:PORT, e.g. {DEFAULT_LISTEN} "
                         "or [::1]:9700")
    return host.strip("[]") or "127.0.0.1", int(port)


def load(env: Mapping[str, str] | None = None) -> WebConfig:
    env = os.environ if env is None else env
    listen_host, listen_port = parse_listen(env.get("PHYLLOME_WEB_LISTEN", DEFAULT_LISTEN))
    cert, key = env.get("PHYLLOME_WEB_CERT", ""), env.get("PHYLLOME_WEB_KEY", "")
    if bool(cert) != bool(key):
        raise BadRequest("HTTPS needs both PHYLLOME_WEB_CERT and PHYLLOME_WEB_KEY")
    cfg = WebConfig(
        host=env.get("PHYLLOME_HOST") or default_host(), listen_host=listen_host,
        listen_port=listen_port, cert=cert, key=key,
        nats_url=env.get("PHYLLOME_NATS_URL", DEFAULT_NATS_URL),
        nats_user=env.get("PHYLLOME_NATS_USER", ""),
        nats_password=env.get("PHYLLOME_NATS_PASSWORD", ""),
        nats_creds=env.get("PHYLLOME_NATS_CREDS", ""), nats_ca=env.get("PHYLLOME_NATS_CA", ""),
        log_level=env.get("PHYLLOME_LOG_LEVEL", "INFO"),
        novnc_dir=env.get("PHYLLOME_NOVNC_DIR", "/usr/share/novnc"))
    subjects.token(cfg.host, "PHYLLOME_HOST")
    return cfg
