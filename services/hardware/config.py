"""Settings of the hardware agent: the ``[hardware]`` table of the config file.

    [hardware]
    proc_root = "/proc"          # where VFIO users are looked for (default: /proc with /sys)
    kvm_probe_timeout_s = 5      # the ioctl-level KVM check runs in a child with this deadline
    sysfs_write_timeout_s = 30   # a bind/unbind/mdev/SR-IOV write blocked longer fails its job

    >>> from shared.config import load
    >>> Settings.from_config(load("hardware", env={"PHYLLOME_STATE_DIR": "/s"})).state_dir
    '/s/hardware'
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from shared.config import Config
from shared.errors import BadRequest


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    sysfs_root: str
    state_dir: str
    proc_root: str | None = None
    root_dev: str | None = None  # "major:minor" of "/" (read from the machine with /sys)
    kvm_probe_timeout_s: float = 5.0
    sysfs_write_timeout_s: float = 30.0

    @classmethod
    def from_config(cls, cfg: Config) -> Settings:
        values = {"sysfs_root": cfg.sysfs_root, "state_dir": str(Path(cfg.state_dir, "hardware")),
                  **cfg.extra}
        try:
            return msgspec.convert(values, cls, strict=False)
        except msgspec.ValidationError as e:
            raise BadRequest(f"[hardware] configuration: {e}") from None
