"""Install media on the real libvirtd and QEMU (TCG): a VM with no disk boots an EFI ISO from
its CD-ROM under OVMF (Secure Boot off), and the medium is ejected while it runs. The VM has
the Windows profile, so the same boot shows that QEMU takes its TCG Hyper-V enlightenments
and clock.

The ISO is made here with ``grub-mkrescue`` (packages grub-common, grub-efi-amd64-bin,
xorriso, mtools) from the phyllome-tiny kernel and initramfs; its GRUB passes
``phyllome.boot=cdrom``, which the tiny guest prints back as ``boot=cdrom``. One guest boot.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from shared.messages.vm import Cdrom, VmCreate, VmDelete, VmRef, VmSpec
from shared.natsserver import NatsServer
from tests.support.libvirt import (
    device_events,
    guest_vm_agent,
    vm_call,
    wait_for_marker,
)
from tests.support.require import require
from tests.support.tiny import TinyImage

pytestmark = [pytest.mark.system, pytest.mark.timeout(400)]

BOOT_S = 240.0  # OVMF under TCG, then GRUB reading the CD: slower than a direct kernel boot
GRUB_CFG = """\
set timeout=0
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
menuentry "phyllome-tiny from CD" {
    linux /vmlinuz console=ttyS0 phyllome.stay=1 phyllome.boot=cdrom panic=-1
    initrd /initrd.gz
}
"""


def make_iso(tiny: TinyImage, out: Path) -> Path:
    """An EFI-bootable ISO9660 image holding the tiny kernel, initramfs and a GRUB."""
    require(shutil.which("grub-mkrescue") is not None and shutil.which("xorriso") is not None
            and Path("/usr/lib/grub/x86_64-efi").is_dir() and shutil.which("mformat") is not None,
            "grub-mkrescue with x86_64-efi (grub-common, grub-efi-amd64-bin, xorriso, mtools)")
    tree = out.parent / "iso-tree"
    (tree / "boot" / "grub").mkdir(parents=True)
    shutil.copy(tiny.kernel, tree / "vmlinuz")
    shutil.copy(tiny.initrd, tree / "initrd.gz")
    (tree / "boot" / "grub" / "grub.cfg").write_text(GRUB_CFG)
    done = subprocess.run(["grub-mkrescue", "-o", str(out), str(tree)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out.chmod(0o644)
    return out


async def test_vm_boots_an_iso_from_its_cdrom_under_uefi_and_ejects_it_live(
        nats_server: NatsServer, tmp_path: Path, guest_dir: Path, libvirtd: str,
        tiny_image: TinyImage) -> None:
    iso = make_iso(tiny_image, guest_dir / "tiny.iso")
    consoles = guest_dir / "consoles"
    async with guest_vm_agent(nats_server.url, tmp_path, libvirtd, guest_dir) as agent, \
            device_events(agent) as events:

        async def call(verb: str, req: Any) -> Any:
            return await vm_call(agent, verb, req)

        spec = VmSpec(name=f"phy-cdrom-{tmp_path.name[-6:]}", firmware="uefi", vcpus=1,
                      memory_mib=512, display="none", cdrom=Cdrom(path=str(iso)),
                      profile="windows")
        vm = await call("create", VmCreate(spec=spec))
        console = consoles / f"{vm.uuid}.log"
        try:
            await call("start", VmRef(vm=vm.uuid))
            seen = await wait_for_marker(console, "ready", BOOT_S)
            assert (seen.get("boot"), seen["firmware"], seen["secureboot"]) == (
                "cdrom", "uefi", "disabled"), seen

            running = await agent.handlers.hv.xml(vm.uuid)
            assert "<hyperv mode='custom'>" in running and "hypervclock" in running

            info = await call("eject", VmRef(vm=vm.uuid))
            assert info.spec.cdrom == Cdrom()
            ev = await asyncio.wait_for(events.get(), 10)
            assert (ev.action, ev.kind, ev.device, ev.live) == ("detached", "cdrom", str(iso),
                                                                True)
            live = await agent.handlers.hv.xml(vm.uuid)
            persistent = await agent.handlers.hv.xml(vm.uuid, inactive=True)
            for xml in (live, persistent):
                devices = xml.split("</metadata>")[1]
                assert "device='cdrom'" in devices and str(iso) not in devices
        finally:
            await call("delete", VmDelete(vm=vm.uuid, force=True))
