"""The hardware agent's passthrough series, computed from the inventory at scrape time."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx

from shared.natsserver import NatsServer
from tests.support.agents import agent_in_process
from tests.support.require import require_binary
from tests.support.sysfs_tree import build, intel_desktop


async def test_passthrough_series_match_the_inventory(nats_server: NatsServer,
                                                      tmp_path: Path) -> None:
    tree = build(tmp_path / "sys", intel_desktop())
    async with agent_in_process("hardware", nats_server.url, tmp_path / "st", "h1",
                                sysfs_root=str(tree.root)) as agent:
        text = httpx.get(agent.metrics_url).text
        devices = agent.handlers.inv.devices()
    verdicts = [d.passthrough.verdict for d in devices if d.passthrough is not None]
    for verdict in ("isolated", "with-companions", "shared-group"):
        line = f'phyllome_hardware_passthrough_devices{{verdict="{verdict}"}}'
        assert f"{line} {float(verdicts.count(verdict))}" in text
    groups = {d.iommu_group for d in devices if d.iommu_group is not None}
    assert f"phyllome_hardware_iommu_groups {float(len(groups))}" in text
    assert 'phyllome_hardware_devices_by_driver{driver="nvidia",kind="gpu"} 1.0' in text
    assert "phyllome_hardware_vfio_bound_devices 0.0" in text
    assert "phyllome_hardware_kvm_usable 0.0" in text
    assert "phyllome_hardware_iommu_enabled 1.0" in text
    check = subprocess.run([require_binary("promtool"), "check", "metrics"], input=text,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
