"""The real libvirtd with /dev/kvm closed to QEMU's user re-probes QEMU on every call; the
vm agent's health check times it (about 10 s here: two QEMU probes, then one to recover)."""

from __future__ import annotations

import pytest

from services.vm.libvirt_backend import LibvirtHypervisor
from tests.support.kvm import closed_kvm

pytestmark = pytest.mark.system


async def test_vm_health_times_a_libvirt_that_reprobes_qemu(libvirtd: str) -> None:
    hv = LibvirtHypervisor(libvirtd)
    await hv.connect()
    try:
        assert await hv.problems() == []
        with closed_kvm():
            found = await hv.problems()
        assert [p.kind for p in found] == ["kvm-access", "libvirt-reprobes-qemu"]
        assert "to answer a repeated QEMU capability query" in found[1].what
        assert await hv.problems() == []  # the node is open again: timed again, and fine
    finally:
        await hv.close()
