"""A guest a person can use, on the real libvirtd and QEMU (TCG): its CPU model covers
x86-64-v2, and disks and NICs plugged into it while it runs show up inside it.

One phyllome-tiny guest (BIOS, direct kernel boot, ``phyllome.stay=1``) serves the whole
test: its ``/init`` prints ``cpu=`` at boot and ``disks=`` / ``nics=`` again whenever they
change (deploy/images/README.md).
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import pytest

from shared import contracts
from shared.messages import Empty
from shared.messages.net import DEFAULT_NETWORK
from shared.messages.vm import (
    Disk,
    Nic,
    VmAttachDisk,
    VmAttachNic,
    VmCreate,
    VmDelete,
    VmDetachDisk,
    VmRef,
    VmSpec,
)
from shared.natsserver import NatsServer
from tests.support.agents import agent_in_process
from tests.support.libvirt import (
    device_events,
    guest_vm_agent,
    markers,
    vm_call,
    wait_for_marker,
)
from tests.support.require import require
from tests.support.tiny import TinyImage
from tests.support.wait import until

pytestmark = [pytest.mark.system, pytest.mark.timeout(300)]

HOST = "h1"
BOOT_S = 90.0
PLUG_S = 60.0
X86_64_V2 = {"cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3"}


async def test_vm_tiny_guest_has_x86_64_v2_and_sees_disks_and_nics_plugged_live(
        nats_server: NatsServer, tmp_path: Path, guest_dir: Path, libvirtd: str,
        tiny_image: TinyImage) -> None:
    for src in (tiny_image.kernel, tiny_image.initrd):
        shutil.copy(src, guest_dir / src.name)
        (guest_dir / src.name).chmod(0o644)
    data = guest_dir / "hot.raw"
    with open(data, "wb") as f:
        f.truncate(16 << 20)
    data.chmod(0o644)
    consoles = guest_dir / "consoles"
    async with guest_vm_agent(nats_server.url, tmp_path, libvirtd, guest_dir) as agent, \
            device_events(agent) as events:

        async def call(verb: str, req: Any) -> Any:
            return await vm_call(agent, verb, req)

        spec = VmSpec(name=f"phy-usable-{tmp_path.name[-6:]}", firmware="bios", vcpus=1,
                      memory_mib=256, display="none", kernel=str(guest_dir / "vmlinuz"),
                      initrd=str(guest_dir / "initrd.gz"),
                      cmdline="console=ttyS0 phyllome.stay=1")
        vm = await call("create", VmCreate(spec=spec))
        console = consoles / f"{vm.uuid}.log"
        try:
            await call("start", VmRef(vm=vm.uuid))
            seen = await wait_for_marker(console, "ready", BOOT_S)
            # QEMU's "max" model under TCG (qemu64, the old default, lacks most of these)
            assert X86_64_V2 <= set(seen["cpu"].split(",")), seen["cpu"]
            assert (seen["disks"], seen["nics"]) == ("none", "none")

            info = await call("attach_disk", VmAttachDisk(vm=vm.uuid, disk=Disk(
                path=str(data))))
            assert [d.path for d in info.spec.disks] == [str(data)]
            ev = await asyncio.wait_for(events.get(), 10)
            assert (ev.action, ev.kind, ev.live) == ("attached", "disk", True)
            await _until_marker(console, "disks", "vda")
            persistent = await agent.handlers.hv.xml(vm.uuid, inactive=True)
            assert f"<source file='{data}'/>" in persistent  # and after the next boot too
            stored = await agent.handlers.hv.spec(vm.uuid)  # the metadata follows
            assert stored is not None and stored.disks == info.spec.disks

            info = await call("attach_nic", VmAttachNic(vm=vm.uuid, nic=Nic(kind="user")))
            mac = info.spec.nics[0].mac
            await _until_marker(console, "nics", "eth0")
            assert f"<mac address='{mac}'/>" in await agent.handlers.hv.xml(
                vm.uuid, inactive=True)

            info = await call("detach_disk", VmDetachDisk(vm=vm.uuid, disk=str(data)))
            assert info.spec.disks == []
            await _until_marker(console, "disks", "none")
            assert str(data) not in (await agent.handlers.hv.xml(
                vm.uuid, inactive=True)).split("</metadata>")[1]
        finally:
            await call("delete", VmDelete(vm=vm.uuid, force=True))
        assert data.exists()


async def _until_marker(console: Path, key: str, value: str) -> None:
    await until(f"the guest to print {key}={value}",
                lambda: markers(console).get(key) == value, timeout=PLUG_S, interval=0.2)


async def test_vm_agent_runs_the_nat_network_phyllome(
        nats_server: NatsServer, tmp_path: Path, libvirtd: str) -> None:
    """With dnsmasq (package dnsmasq-base) libvirt runs the NAT network the agent keeps."""
    require(shutil.which("dnsmasq") is not None, "dnsmasq (package dnsmasq-base)")
    async with agent_in_process("vm", nats_server.url, tmp_path, host=HOST,
                                libvirt_uri=libvirtd, accelerator="tcg",
                                extra={"reconcile_s": 3600}) as agent:
        listed = await agent.bus.call(HOST, contracts.spec("vm", "net_list"), Empty())
        [net] = [n for n in listed.networks if n.name == DEFAULT_NETWORK]
        assert (net.mode, net.active, net.autostart) == ("nat", True, True)
        assert not [p for p in agent.problems if p.kind == "network"]
