"""Settings of the catalogue agent: the ``[catalogue]`` table of the config file.

    [catalogue]
    pool_dir = "/var/lib/phyllome/images/pool"       # default <state dir>/images/pool
    builtin_dir = "/var/lib/phyllome/images/builtin"  # <id>/disk.raw, e.g. phyllome-tiny
    osinfo_dir = "/usr/share/osinfo"                  # "" = no osinfo-db entries
    local_dirs = ["/srv/images"]                      # file:// URLs allowed under these
    mirrors = {"https://cloud.debian.org/" = "http://mirror.lan/debian-cloud/"}
    sources = [{name = "lab", kind = "manifest", url = "http://mirror.lan/images.json"},
               {name = "ubuntu", kind = "simplestreams",
                url = "https://cloud-images.ubuntu.com/releases/",  # signed: read its .sjson
                keyring = "/usr/share/keyrings/ubuntu-cloudimage-keyring.gpg"}]
    max_unpacked_bytes = 0          # 0 = the pool's free space
    probe_interval_s = 3600         # link-rot HEAD probes; 0 = off
    probe_osinfo = false            # also probe osinfo-db's third-party URLs (hundreds)
    auto_pull = ["phyllome-tiny"]   # built-in images put in the pool at start
    gpgv_timeout_s = 30             # checking a signed index's signature

    >>> from shared.config import load
    >>> s = Settings.from_config(load("catalogue", env={"PHYLLOME_STATE_DIR": "/s"}))
    >>> s.pool_dir
    '/s/images/pool'
"""

from __future__ import annotations

import platform
from pathlib import Path

import msgspec

from shared.config import Config
from shared.errors import BadRequest


class ConfiguredSource(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: str
    url: str
    kind: str = "manifest"
    keyring: str = ""  # simplestreams: read the signed .sjson index, checked with this keyring


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pool_dir: str
    builtin_dir: str
    osinfo_dir: str = "/usr/share/osinfo"
    local_dirs: list[str] = []
    mirrors: dict[str, str] = {}
    sources: list[ConfiguredSource] = []
    max_unpacked_bytes: int = 0
    max_index_bytes: int = 64 << 20
    probe_interval_s: float = 3600.0
    # osinfo-db lists hundreds of vendors' URLs: probing them from every host hourly is not
    # polite by default (nor possible offline); the operator's own sources are probed.
    probe_osinfo: bool = False
    auto_pull: list[str] = msgspec.field(default_factory=lambda: ["phyllome-tiny"])
    timeout_s: float = 30.0
    gpgv_timeout_s: float = 30.0
    retries: int = 5
    max_redirects: int = 5
    arch: str = platform.machine()
    replicas: int = 1  # read by shared.agent for the KV buckets

    @classmethod
    def from_config(cls, cfg: Config) -> Settings:
        images = Path(cfg.state_dir) / "images"
        values = {"pool_dir": str(images / "pool"), "builtin_dir": str(images / "builtin"),
                  **cfg.extra}
        try:
            settings = msgspec.convert(values, cls)
        except msgspec.ValidationError as e:
            raise BadRequest(f"[catalogue] configuration: {e}") from None
        # the built-in images are a local source by definition
        return msgspec.structs.replace(
            settings, local_dirs=[settings.builtin_dir, *settings.local_dirs])
