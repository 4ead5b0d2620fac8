"""VIRTIO 1.2 devices in a real guest: phyllome-tiny on the real libvirtd and QEMU (TCG).

The guest mounts a virtio-fs share (``phyllome.share=TAG`` on its command line), prints the
first line of the share's ``hello.txt`` as ``PHYLLOME-TINY: share=TAG:...`` and writes
``guest.txt`` back. vsock needs the host kernel's ``vhost_vsock`` (``/dev/vhost-vsock``);
a host without it refuses a vsock VM, and says how to get it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from shared import contracts
from shared.agent import Agent
from shared.errors import BadRequest
from shared.messages.vm import Share, VmCreate, VmDelete, VmRef, VmSpec, VmUpdate
from shared.natsserver import NatsServer
from tests.support.agents import agent_in_process
from tests.support.libvirt import wait_for_marker
from tests.support.tiny import TinyImage
from tests.support.wait import until

pytestmark = [pytest.mark.system, pytest.mark.timeout(240)]

HOST = "h1"
BOOT_S = 90.0


@contextlib.asynccontextmanager
async def vm_agent(nats: NatsServer, state: Path, files: Path) -> AsyncIterator[Agent]:
    extra = {"reconcile_s": 3600, "console_dir": str(files / "consoles"),
             "disk_dir": str(files / "disks"), "tiny_dir": str(files)}
    async with agent_in_process("vm", nats.url, state, host=HOST, accelerator="tcg",
                                libvirt_uri="qemu:///system", extra=extra) as agent:
        yield agent


async def call(agent: Agent, verb: str, req: Any, timeout: float = 30.0) -> Any:
    return await agent.bus.call(HOST, contracts.spec("vm", verb), req, timeout=timeout)


async def test_vm_guest_mounts_a_share_reads_what_the_host_wrote_and_writes_back(
        nats_server: NatsServer, tmp_path: Path, guest_dir: Path, libvirtd: str,
        tiny_image: TinyImage) -> None:
    kernel, initrd = tiny_image.boot_files_in(guest_dir)
    share = guest_dir / "share"
    share.mkdir()
    (share / "hello.txt").write_text("hello from the host\n")
    name = f"phy-fs-{os.getpid()}"
    async with vm_agent(nats_server, tmp_path, guest_dir) as agent:
        info = await call(agent, "create", VmCreate(spec=VmSpec(
            name=name, firmware="bios", memory_mib=256, vcpus=1, display="none",
            video="none", kernel=str(kernel), initrd=str(initrd),
            cmdline="console=ttyS0 phyllome.stay=1 phyllome.share=data")))
        try:
            info = await call(agent, "update", VmUpdate(vm=name, shares=[
                Share(source=str(share), tag="data")]))
            await call(agent, "start", VmRef(vm=name))
            seen = await wait_for_marker(guest_dir / "consoles" / f"{info.uuid}.log", "ready",
                                         BOOT_S)
            assert seen["share"] == "data:hello from the host"
            assert "fs" in seen["virtio"].split(",")
            await until("the guest's file on the share", (share / "guest.txt").exists,
                        timeout=30)
            assert (share / "guest.txt").read_text().startswith("written by")
        finally:
            await call(agent, "delete", VmDelete(vm=info.uuid, force=True))


async def test_vm_vsock_gets_a_guest_cid_or_is_refused_without_vhost_vsock(
        nats_server: NatsServer, tmp_path: Path, guest_dir: Path, libvirtd: str,
        tiny_image: TinyImage) -> None:
    name = f"phy-vsock-{os.getpid()}"
    kernel, initrd = tiny_image.boot_files_in(guest_dir)
    spec = VmSpec(name=name, firmware="bios", memory_mib=256, vcpus=1, display="none",
                  video="none", vsock=True, kernel=str(kernel), initrd=str(initrd),
                  cmdline="console=ttyS0 phyllome.stay=1")
    async with vm_agent(nats_server, tmp_path, guest_dir) as agent:
        if not Path("/dev/vhost-vsock").exists():
            with pytest.raises(BadRequest, match="no /dev/vhost-vsock: load the vhost_vsock"):
                await call(agent, "create", VmCreate(spec=spec))
            return
        info = await call(agent, "create", VmCreate(spec=spec))
        try:
            assert info.vsock_cid == 0  # chosen at start
            info = await call(agent, "start", VmRef(vm=name))
            assert info.vsock_cid >= 3
        finally:
            await call(agent, "delete", VmDelete(vm=info.uuid, force=True))
