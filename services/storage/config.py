"""Settings of the storage agent: the ``[storage]`` table of the config file.

    [storage]
    pools = { fast = "/srv/fast-pool" }   # more pools; "default" is <state dir>/pools/default
    import_dirs = ["/srv/incoming"]       # where `import_file` may read from (default:
                                          # <state dir>/import and the catalogue's images/pool)
    chunk_bytes = 4194304                 # transfer chunk (capped by the server's max_payload)
    window = 8                            # transfer chunks in flight (at most 32 MiB)
    chunk_timeout_s = 10                  # a chunk not acknowledged by then is a cut
    resume_timeout_s = 120                # a sender gives up after this long without progress
    stale_s = 3600                        # a receiver rolls back transfers idle this long
    commit_every = 268435456              # a receiver fsyncs at least every this many bytes
    commit_interval_s = 1.0               # ... and every this many seconds

    >>> from shared.config import load
    >>> Settings.from_config(load("storage", env={"PHYLLOME_STATE_DIR": "/s"})).pools
    {'default': '/s/pools/default'}
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from shared.config import Config
from shared.errors import BadRequest


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pools: dict[str, str]
    import_dirs: list[str]
    chunk_bytes: int = 4 << 20
    window: int = 8
    chunk_timeout_s: float = 10.0
    resume_timeout_s: float = 120.0
    stale_s: float = 3600.0
    commit_every: int = 256 << 20
    commit_interval_s: float = 1.0
    replicas: int = 1

    @classmethod
    def from_config(cls, cfg: Config) -> Settings:
        state = Path(cfg.state_dir)
        extra = dict(cfg.extra)
        pools = {"default": str(state / "pools" / "default"), **extra.pop("pools", {})}
        # The catalogue's image pool is an import source: `vm create --image` copies from it.
        values = {"pools": pools,
                  "import_dirs": [str(state / "import"), str(state / "images" / "pool")],
                  **extra}
        try:
            settings = msgspec.convert(values, cls, strict=False)
        except msgspec.ValidationError as e:
            raise BadRequest(f"[storage] configuration: {e}") from None
        for name, path in settings.pools.items():
            if not Path(path).is_absolute():
                raise BadRequest(f"[storage] pool {name!r}: path {path!r} is not absolute")
        if settings.chunk_bytes < 65536 or settings.window < 1:
            raise BadRequest("[storage] chunk_bytes must be at least 65536 and window at least 1")
        return settings
