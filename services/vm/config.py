"""Settings of the vm agent: the ``[vm]`` table of the config file.

    [vm]
    tiny_dir = "/var/lib/phyllome/images/builtin/phyllome-tiny"  # vmlinuz + initrd.gz
    disk_dir = "/var/lib/phyllome/vm/disks"   # VM disks copied here when no storage agent
    console_dir = "/var/lib/phyllome/vm/consoles"   # serial console logs, <uuid>.log
    migration_dir = "/var/lib/phyllome/vm/migrations"   # the migrations' journal, <uuid>.json
    snapshot_dir = "/var/lib/phyllome/vm/snapshots"  # backup schedules, unfinished reverts
    kvm_probe_deadline_s = 10       # the KVM boot probe's wait for the guest's marker
    reconcile_s = 30                # periodic reconciliation against libvirt
    libvirt_dir = "/var/lib/libvirt"  # libvirt's NVRAM (qemu/nvram) and TPM state (swtpm);
                                      # default: that one, none for the test driver
    kvm_device = "/dev/kvm"         # whose access by QEMU's user the health check looks at
    nat_subnet = ""                 # of the NAT network phyllome when first defined;
                                    # default: the first free 10.89.x.0/24
    address_poll_s = 5              # how often running guests' addresses are read (every
                                    # 1 s while a VM that started has none yet, up to 5 min)
    replicas = 1                    # read by shared.agent for the KV buckets

The accelerator policy (auto|kvm|tcg) is the common ``accelerator`` setting
(``PHYLLOME_ACCELERATOR``).

    >>> from shared.config import load
    >>> Settings.from_config(load("vm", env={"PHYLLOME_STATE_DIR": "/s"})).disk_dir
    '/s/vm/disks'
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from shared.config import Config
from shared.errors import BadRequest


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    tiny_dir: str
    disk_dir: str
    console_dir: str
    migration_dir: str
    snapshot_dir: str
    probe_dir: str
    kvm_probe_deadline_s: float = 10.0
    reconcile_s: float = 30.0
    libvirt_dir: str = ""
    kvm_device: str = "/dev/kvm"
    nat_subnet: str = ""
    address_poll_s: float = 5.0
    replicas: int = 1

    @classmethod
    def from_config(cls, cfg: Config) -> Settings:
        state = Path(cfg.state_dir)
        values = {
            "tiny_dir": str(state / "images" / "builtin" / "phyllome-tiny"),
            "disk_dir": str(state / "vm" / "disks"),
            "console_dir": str(state / "vm" / "consoles"),
            "migration_dir": str(state / "vm" / "migrations"),
            "snapshot_dir": str(state / "vm" / "snapshots"),
            "probe_dir": str(state / "vm"),
            **cfg.extra,
        }
        try:
            return msgspec.convert(values, cls, strict=False)
        except msgspec.ValidationError as e:
            raise BadRequest(f"[vm] configuration: {e}") from None
