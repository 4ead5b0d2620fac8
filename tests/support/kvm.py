"""This machine's /dev/kvm closed as a host without udevd has it, for a check that takes
moments, and put back however the test leaves::

    with closed_kvm():                 # crw------- root root
        assert health.kvm_access() is not None
"""

from __future__ import annotations

import contextlib
import grp
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from services.vm import health
from tests.support.require import require, require_root

KVM = Path("/dev/kvm")


def require_qemu_in_kvm() -> None:
    """What the checks need to call a 0660 root:kvm node fine: QEMU's user in group kvm."""
    require_root()
    ident = health.qemu_identity(health.QEMU_CONF)
    require(ident is not None, f"libvirt's QEMU user ({health.QEMU_USER})")
    assert ident is not None
    require(grp.getgrnam("kvm").gr_gid in ident[2], "QEMU's user in group kvm")


@contextlib.contextmanager
def closed_kvm() -> Iterator[None]:
    require(KVM.is_char_device(), "/dev/kvm")
    require_qemu_in_kvm()
    st = KVM.stat()
    try:
        os.chown(KVM, 0, 0)
        os.chmod(KVM, 0o600)
        yield
    finally:
        os.chown(KVM, st.st_uid, st.st_gid)
        os.chmod(KVM, stat.S_IMODE(st.st_mode))
