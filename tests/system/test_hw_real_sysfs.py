"""`phyllome hw report --json` against this machine's real /sys (and /proc, /dev/kvm)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from shared.bus import Bus
from shared.messages import Empty
from shared.messages import hardware as hardware_api
from shared.messages.hardware import DeviceQuery
from tests.support.agents import AgentProcess
from tests.support.require import require

REPO = Path(__file__).resolve().parents[2]


def cpu_vendor() -> str:
    text = Path("/proc/cpuinfo").read_text()
    return "intel" if "GenuineIntel" in text else "amd" if "AuthenticAMD" in text else "other"


def test_report_on_this_machine() -> None:
    require(os.path.isdir("/sys/bus/pci/devices"), "a real /sys with PCI devices")
    out = subprocess.run([sys.executable, "-m", "cli.main", "hw", "report", "--json"],
                         cwd=REPO, capture_output=True, text=True, check=True, timeout=60)
    data = json.loads(out.stdout)
    addresses = sorted(os.listdir("/sys/bus/pci/devices"))
    assert [d["address"] for d in data["devices"]] == addresses
    host = data["host"]
    assert host["cpu_vendor"] == cpu_vendor()
    # only the VM agent's boot probe may say KVM is usable; the ioctl check alone never does
    assert host["kvm_usable"] is False and host["kvm_boot_probe"] == "not-run"
    if os.path.exists("/dev/kvm"):
        assert host["kvm_ioctl"] in ("passed", "failed")
    groups = os.listdir("/sys/kernel/iommu_groups")
    if groups:
        assert host["iommu"] and len(data["groups"]) == len(groups)
        return
    # no IOMMU here: every non-bridge device gets no-iommu and the vendor's way to turn it on
    assert host["iommu"] is False and data["groups"] == []
    hint = host["iommu_hint"]
    assert ("intel_iommu=on" in hint) if cpu_vendor() == "intel" else ("AMD-Vi" in hint)
    verdicts = {d["passthrough"]["verdict"] for d in data["devices"] if d["passthrough"]}
    assert verdicts == {"no-iommu"}
    for d in data["devices"]:
        if d["passthrough"]:
            assert d["passthrough"]["reasons"] == [hint]
    root = os.stat("/").st_dev
    disk = os.path.realpath(f"/sys/dev/block/{os.major(root)}:{os.minor(root)}")
    holder = [d for d in data["devices"] if f"/{d['address']}/" in disk]
    if holder:
        assert any("root filesystem" in x for x in holder[-1]["passthrough"]["host_loses"])


async def test_agent_process_on_this_machine(nats_server, tmp_path: Path) -> None:
    """`python -m services.hardware` as a real process: caps carry the ioctl check only."""
    require(os.path.isdir("/sys/bus/pci/devices"), "a real /sys with PCI devices")
    proc = AgentProcess("hardware", nats_server.url, tmp_path, host="h1")
    await proc.start()
    try:
        bus = await Bus.connect(nats_server.url, name="t", host="h1", give_up_after=5)
        try:
            caps = await bus.call("h1", hardware_api.CAPS, Empty())
            listed = await bus.call("h1", hardware_api.LIST, DeviceQuery())
        finally:
            await bus.close()
        assert caps.cpu_vendor == cpu_vendor() and caps.kvm_usable is False
        if os.path.exists("/dev/kvm"):
            assert caps.kvm_ioctl in ("passed", "failed") and caps.kvm_ioctl_detail
        assert [d.address for d in listed.devices] == sorted(os.listdir("/sys/bus/pci/devices"))
    finally:
        assert await proc.stop() == 0, proc.log()
