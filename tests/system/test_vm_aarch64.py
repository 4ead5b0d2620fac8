"""An aarch64 guest on this x86_64 host: phyllome-tiny's arm64 build, pulled from the
catalogue for that arch, booted by the vm agent through the real libvirtd on QEMU's ``virt``
machine (TCG) from its disk: AAVMF with Microsoft's keys (Secure Boot), shim, GRUB, the
signed arm64 kernel, a TIS TPM on swtpm, VNC on virtio-gpu, the PL011 serial console::

    .venv/bin/pytest -q -m system tests/system/test_vm_aarch64.py -s   # prints the boot time
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from shared import archs, contracts
from shared.agent import Agent
from shared.errors import ArchMismatch, Conflict, Timeout
from shared.messages import catalogue as catalogue_api
from shared.messages.catalogue import ImageInfo, ImageRef, PullRequest
from shared.messages.vm import VmCreate, VmDelete, VmInfo, VmRef, VmShutdown, VmSpec
from shared.natsserver import NatsServer
from tests.support.agents import agent_in_process
from tests.support.libvirt import markers, wait_for_marker
from tests.support.require import require, require_binary
from tests.support.tiny import TinyImage
from tests.support.wait import until

pytestmark = [pytest.mark.system, pytest.mark.timeout(420)]

HOST = "h1"
# TCG emulating arm64 on 2 shared x86 cores: AAVMF alone takes tens of seconds
# (measured: about 40 s to `ready` with the machine loaded, see docs/benchmarks.md)
BOOT_S = 240.0


def vnc_banner(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        return s.recv(12)


@contextlib.asynccontextmanager
async def agents(nats: NatsServer, state: Path, files: Path, tiny: TinyImage
                 ) -> AsyncIterator[tuple[Agent, Agent]]:
    """A catalogue agent whose built-in phyllome-tiny has only its aarch64 build (in the
    arch's folder, as ``deploy/setup.sh tiny`` places it), and a vm agent on qemu:///system."""
    builtin = state / "builtin" / "phyllome-tiny"
    builtin.mkdir(parents=True)
    (builtin / "aarch64").symlink_to(tiny.disk.parent)
    catalogue = {"osinfo_dir": "", "probe_interval_s": 0, "auto_pull": [],
                 "builtin_dir": str(builtin.parent),
                 "mirrors": {"https://": "http://127.0.0.1:9/"}}  # nothing remote
    vm = {"reconcile_s": 3600, "console_dir": str(files / "consoles"),
          "disk_dir": str(files / "disks"), "tiny_dir": str(files)}
    async with agent_in_process("catalogue", nats.url, state / "c", host=HOST,
                                extra=catalogue) as cat, \
            agent_in_process("vm", nats.url, state / "v", host=HOST, accelerator="tcg",
                             libvirt_uri="qemu:///system", extra=vm) as vms:
        try:
            yield cat, vms
        finally:
            with contextlib.suppress(Exception):
                for dom in await vms.handlers.hv.domains():
                    if dom.spec is not None and dom.spec.name.startswith("phy-arm-"):
                        await call(vms, "delete", VmDelete(vm=dom.uuid, force=True))


async def call(agent: Agent, verb: str, req: Any, timeout: float = 60.0) -> Any:
    return await agent.bus.call(HOST, contracts.spec("vm", verb), req, timeout=timeout)


async def test_vm_aarch64_guest_boots_its_disk_under_secure_boot_with_tpm_and_vnc(
        nats_server: NatsServer, tmp_path: Path, guest_dir: Path, libvirtd: str,
        tiny_image_aarch64: TinyImage) -> None:
    require_binary("qemu-system-aarch64")
    have = archs.guest_arch("aarch64")
    require(have.secure_boot, "AAVMF with Microsoft's keys (package qemu-efi-aarch64)")
    name = f"phy-arm-{uuid.uuid4().hex[:6]}"
    async with agents(nats_server, tmp_path, guest_dir, tiny_image_aarch64) as (cat, vms):
        spec = VmSpec(name=name, arch="aarch64", memory_mib=512, vcpus=1, secure_boot=True,
                      tpm="emulated-2.0", display="vnc")
        with pytest.raises(Conflict, match="images pull phyllome-tiny --arch aarch64"):
            await call(vms, "create", VmCreate(spec=spec, image="phyllome-tiny"))

        accepted = await cat.bus.call(HOST, catalogue_api.PULL,
                                      PullRequest(id="phyllome-tiny", arch="aarch64"))
        status = await cat.jobs.wait(accepted.job_id)
        assert status.state == "succeeded", status.message
        image: ImageInfo = await cat.bus.call(HOST, catalogue_api.INFO,
                                              ImageRef(id="phyllome-tiny", arch="aarch64"))
        assert image.local is not None and image.local.arch == "aarch64"
        assert image.entry.archs == ["aarch64"] and image.local.state == "ready"

        # an x86_64 guest cannot boot it
        with pytest.raises(ArchMismatch, match="image for aarch64, not for x86_64 guests"):
            await call(vms, "create", VmCreate(spec=VmSpec(name=f"{name}-x86", memory_mib=512),
                                               image="phyllome-tiny"))

        info: VmInfo = await call(vms, "create", VmCreate(spec=spec, image="phyllome-tiny"))
        assert (info.spec.arch, info.spec.machine) == ("aarch64", "virt")
        started = time.monotonic()
        info = await call(vms, "start", VmRef(vm=info.uuid))
        assert (info.state, info.accelerator) == ("running", "tcg")
        assert "aarch64 guest on an x86_64 host" in info.accelerator_note
        assert info.vnc is not None
        assert await asyncio.to_thread(vnc_banner, info.vnc.port) == b"RFB 003.008\n"

        console = guest_dir / "consoles" / f"{info.uuid}.log"
        seen = await wait_for_marker(console, "ready", BOOT_S)
        took = time.monotonic() - started
        print(f"aarch64 tiny guest (AAVMF Secure Boot, disk, TPM): ready after {took:.1f} s")
        assert (seen["arch"], seen["firmware"], seen["secureboot"]) == \
            ("aarch64", "uefi", "enabled")
        assert (seen["tpm"], seen["tpm_version"]) == ("present", "2")
        assert seen["kernel"].endswith("-cloud-arm64") and seen["mode"] == "stay"
        assert "blk" in seen["virtio"].split(",") and seen["disks"] == "vda"
        assert "secureboot: Secure boot enabled" in console.read_text(errors="replace")

        # the virt machine's ACPI power button (GED -> PWRB): the guest's acpid powers it off
        off: bool = await until("the guest to power off by its ACPI power button",
                                lambda: _press_power_button(vms, info.uuid), timeout=240,
                                interval=1)
        assert off
        assert markers(console).get("poweroff") == "acpi"
        await call(vms, "delete", VmDelete(vm=info.uuid))


async def _press_power_button(vms: Agent, vm_uuid: str) -> bool:
    """One press; False when the guest is still up 30 s later. The guest starts acpid in
    the background just before it says ``ready``, and under TCG on a loaded machine acpid may
    open the input devices seconds later: a press before that is lost, so press again."""
    try:
        info = await call(vms, "shutdown", VmShutdown(vm=vm_uuid, timeout_s=30), timeout=60)
    except Timeout:
        return False
    return bool(info.state == "shutoff")
