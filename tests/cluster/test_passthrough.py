"""VMs with host devices, placed and migrated across hosts whose hardware agents read fixture
sysfs trees: two Intel desktops with an RTX 2070 (VGA, HDMI audio, USB, UCSI on one card), a
server with an SR-IOV NIC, a Kaby Lake desktop with GVT-g mdev types. Each host runs a real
hardware agent (its tree), storage agent and vm agent (libvirt's test driver) on one
nats-server; placement and migration read what the hardware agents put in their heartbeats.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from shared.agent import Agent
from shared.errors import InsufficientResources
from shared.jobs import wait_job
from shared.messages import vm as vm_api
from shared.messages.vm import VmCreate, VmMigrate, VmRef, VmSpec
from shared.natsserver import NatsServer
from shared.placement import choose
from tests.support.agents import agent_in_process
from tests.support.libvirt import TEST_HOST_XML
from tests.support.sysfs_tree import FIXTURES, build

pytestmark = pytest.mark.integration

HOSTS = {"a": "intel-desktop", "b": "intel-desktop", "c": "sriov-nic", "d": "intel-gvtg"}
CARD = ["0000:01:00.0", "0000:01:00.1", "0000:01:00.2", "0000:01:00.3"]  # the RTX 2070
VFS = ["0000:03:10.0", "0000:03:10.2"]  # made on c's 82599 port 0
MDEV = "9f5c1a2e-5f7b-4c1e-8a5b-3a4f1e2d3c4b"  # made on d's HD 630


@contextlib.asynccontextmanager
async def cluster(nats: NatsServer, root: Path) -> AsyncIterator[Agent]:
    """The four hosts; yields host a's vm agent (its bus reads the cluster)."""
    async with contextlib.AsyncExitStack() as stack:
        agents: dict[tuple[str, str], Agent] = {}
        for host, fixture in HOSTS.items():
            state = root / host
            tree = FIXTURES[fixture]()
            sysfs = build(state / "sys", tree).root
            (state / "proc").mkdir()
            (state / "host.xml").write_text(TEST_HOST_XML)
            for name, extra in (
                    ("hardware", {"sysfs_root": str(sysfs),
                                  "extra": {"root_dev": tree.root_dev,
                                            "proc_root": str(state / "proc")}}),
                    ("storage", {}),
                    ("vm", {"libvirt_uri": f"test://{state / 'host.xml'}", "accelerator": "tcg",
                            "extra": {"reconcile_s": 3600, "disk_dir": str(state / "disks")}})):
                agents[(host, name)] = await stack.enter_async_context(
                    agent_in_process(name, nats.url, state, host=host, **extra))
        yield agents[("a", "vm")]


def spec(name: str, hostdevs: list[str]) -> VmSpec:
    return VmSpec(name=name, memory_mib=64, vcpus=1, firmware="bios", display="none",
                  hostdevs=hostdevs)


async def test_vms_go_where_their_devices_are(nats_server: NatsServer, tmp_path: Path) -> None:
    async with cluster(nats_server, tmp_path) as vm:
        card = await choose(vm.bus, spec("g", CARD))
        assert card.host in ("a", "b") and "has 1 GPU(s) (+3 function(s))" in card.reason
        assert "no passable device 0000:01:00.0" in card.passed_over["c"]
        vfs = await choose(vm.bus, spec("n", VFS))
        assert vfs.host == "c" and vfs.reason.endswith("has 2 VF(s) of 0000:03:00.0")
        mdev = await choose(vm.bus, spec("v", [MDEV]))
        assert mdev.host == "d" and mdev.reason.endswith("has 1 mdev i915-GVTg_V5_4")
        with pytest.raises(InsufficientResources) as e:
            await choose(vm.bus, spec("x", CARD[:1]))
        assert ("a: 0000:01:00.0 must be passed with 0000:01:00.1, 0000:01:00.2, "
                "0000:01:00.3 (the other functions of its card)") in e.value.message


async def test_a_vm_with_a_gpu_and_its_functions_migrates(nats_server: NatsServer,
                                                          tmp_path: Path) -> None:
    async with cluster(nats_server, tmp_path) as vm:
        created = await vm.bus.call("a", vm_api.CREATE, VmCreate(spec=spec("g", CARD)))
        accepted = await vm.bus.call("a", vm_api.MIGRATE, VmMigrate(vm="g", to="c"))
        refused = await wait_job(vm.bus, "a", "vm", accepted.job_id, timeout=120)
        assert (refused.state, refused.error_kind) == ("failed", InsufficientResources.kind)
        assert "c cannot take g: no passable device 0000:01:00.0" in refused.message
        accepted = await vm.bus.call("a", vm_api.MIGRATE, VmMigrate(vm="g", to="b"))
        moved = await wait_job(vm.bus, "a", "vm", accepted.job_id, timeout=120)
        assert moved.state == "succeeded", moved.message
        there = await vm.bus.call("b", vm_api.INFO, VmRef(vm="g"))
        assert there.uuid == created.uuid and there.spec.hostdevs == CARD
