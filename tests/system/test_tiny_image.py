"""phyllome-tiny really boots under plain QEMU (TCG) and says what it sees.

The VM agent's system tests boot the same image through libvirt; these tests pin down the
image itself: direct kernel boot under SeaBIOS and under OVMF, the RAW disk under OVMF
Secure Boot with a swtpm TPM 2.0, the ACPI power button in stay mode, and the build cache::

    .venv/bin/pytest -x -q -m system tests/system/test_tiny_image.py -s   # prints boot times
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from tests.support.libvirt import markers
from tests.support.require import require, require_binary
from tests.support.tiny import BUILD_SCRIPT, REPO, TinyImage

pytestmark = [pytest.mark.system]

OVMF = Path("/usr/share/OVMF")
BOOT_DEADLINE_S = 90.0  # TCG on 2 shared cores; measured: 2.5 s direct, about 15 s from disk


class Qemu:
    """One QEMU process, its serial log (ttyS0) and its QMP socket."""

    def __init__(self, proc: asyncio.subprocess.Process, tmp: Path) -> None:
        self.proc = proc
        self.log, self.qmp, self.stderr = tmp / "serial.log", tmp / "qmp.sock", tmp / "qemu.err"
        self.started = time.monotonic()

    async def ready(self) -> tuple[dict[str, str], float]:
        """All markers once the guest printed ``ready``, and the seconds it took.

        Fails at once when QEMU exits first, else after BOOT_DEADLINE_S.
        """
        deadline = self.started + BOOT_DEADLINE_S
        while "ready" not in (found := markers(self.log)):
            if self.proc.returncode is not None or time.monotonic() > deadline:
                serial = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
                raise AssertionError(
                    f"no PHYLLOME-TINY: ready (QEMU exit status {self.proc.returncode});\n"
                    f"serial console:\n{serial}\nQEMU said: {self.stderr.read_text()[-2000:]}")
            await asyncio.sleep(0.1)
        return found, time.monotonic() - self.started

    async def exited(self, timeout: float = 30.0) -> int:
        return await asyncio.wait_for(self.proc.wait(), timeout)

    async def power_button(self) -> None:
        """Press the ACPI power button, as libvirt's ``virsh shutdown`` does."""
        reader, writer = await asyncio.open_unix_connection(str(self.qmp))
        try:
            await reader.readline()  # greeting
            for command in ("qmp_capabilities", "system_powerdown"):
                writer.write(json.dumps({"execute": command}).encode() + b"\n")
                await writer.drain()
                reply = json.loads(await reader.readline())
                while "event" in reply:  # QMP events arrive between command and reply
                    reply = json.loads(await reader.readline())
                assert "return" in reply, reply
        finally:
            writer.close()


@asynccontextmanager
async def qemu(tmp: Path, *args: str) -> AsyncIterator[Qemu]:
    """QEMU under TCG on q35 with the given extra arguments; killed on the way out."""
    binary = require_binary("qemu-system-x86_64")
    with open(tmp / "qemu.err", "wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            binary, "-accel", "tcg", "-nodefaults", "-no-user-config", "-display", "none",
            "-no-reboot", "-serial", f"file:{tmp / 'serial.log'}",
            "-qmp", f"unix:{tmp / 'qmp.sock'},server=on,wait=off", *args,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=stderr)
    try:
        yield Qemu(proc, tmp)
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


def virtio_devices(disk: Path, *, boot: bool = False) -> list[str]:
    """The disk (writes discarded) on virtio, a virtio NIC (user networking), a virtio RNG."""
    return ["-drive", f"file={disk},format=raw,if=none,id=d0,snapshot=on",
            "-device", "virtio-blk-pci,drive=d0" + (",bootindex=0" if boot else ""),
            "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0",
            "-device", "virtio-rng-pci"]


def ovmf(tmp: Path, *, secure_boot: bool) -> list[str]:
    """OVMF flash (4 MiB build) with a private copy of its variable store."""
    suffix = ".ms" if secure_boot else ""
    code, template = OVMF / f"OVMF_CODE_4M{suffix}.fd", OVMF / f"OVMF_VARS_4M{suffix}.fd"
    require(code.is_file() and template.is_file(), f"OVMF firmware ({code}; package ovmf)")
    vars_copy = tmp / "OVMF_VARS.fd"
    shutil.copyfile(template, vars_copy)
    args = ["-drive", f"if=pflash,format=raw,unit=0,file={code},readonly=on",
            "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}"]
    if secure_boot:
        args += ["-global", "driver=cfi.pflash01,property=secure,value=on"]
    return args


@asynccontextmanager
async def swtpm(tmp: Path) -> AsyncIterator[list[str]]:
    """A swtpm TPM 2.0 on a socket; yields QEMU's arguments for a CRB TPM on it."""
    binary = require_binary("swtpm")
    state, sock = tmp / "tpm", tmp / "swtpm.sock"
    state.mkdir()
    proc = await asyncio.create_subprocess_exec(
        binary, "socket", "--tpm2", "--tpmstate", f"dir={state}",
        "--ctrl", f"type=unixio,path={sock}", "--terminate",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert proc.returncode is None and time.monotonic() < deadline, "swtpm did not start"
            await asyncio.sleep(0.05)
        yield ["-chardev", f"socket,id=tpm,path={sock}", "-tpmdev", "emulator,id=tpm0,chardev=tpm",
               "-device", "tpm-crb,tpmdev=tpm0"]
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


def direct_boot(image: TinyImage, cmdline: str = "console=ttyS0 panic=-1") -> list[str]:
    return ["-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", cmdline]


async def test_direct_boot_under_bios_reports_the_guest_and_powers_off(
        tmp_path: Path, tiny_image: TinyImage) -> None:
    async with qemu(tmp_path, "-machine", "q35", "-m", "256", *direct_boot(tiny_image),
                    *virtio_devices(tiny_image.disk)) as vm:
        found, took = await vm.ready()
        assert await vm.exited() == 0
    print(f"direct boot, BIOS: ready after {took:.1f} s")
    assert found["kernel"] == tiny_image.kernel_version
    assert found["firmware"] == "bios"
    assert found["secureboot"] == "disabled"
    assert found["tpm"] == "absent"
    assert set(found["virtio"].split(",")) >= {"blk", "net", "rng"}
    assert found["disks"] == "vda"
    assert found["mode"] == "poweroff"
    assert "warning" not in found, found


async def test_direct_boot_under_uefi_without_secure_boot(
        tmp_path: Path, tiny_image: TinyImage) -> None:
    async with qemu(tmp_path, "-machine", "q35", "-m", "256",
                    *ovmf(tmp_path, secure_boot=False), *direct_boot(tiny_image)) as vm:
        found, took = await vm.ready()
        assert await vm.exited() == 0
    print(f"direct boot, OVMF: ready after {took:.1f} s")
    assert (found["firmware"], found["secureboot"]) == ("uefi", "disabled")
    assert found["virtio"] == "none"


async def test_raw_disk_boots_under_secure_boot_with_tpm_and_obeys_the_power_button(
        tmp_path: Path, tiny_image: TinyImage) -> None:
    async with swtpm(tmp_path) as tpm, \
            qemu(tmp_path, "-machine", "q35,smm=on", "-m", "512",
                 *ovmf(tmp_path, secure_boot=True), *tpm,
                 *virtio_devices(tiny_image.disk, boot=True)) as vm:
        found, took = await vm.ready()
        print(f"RAW disk, OVMF Secure Boot + TPM: ready after {took:.1f} s")
        assert found["kernel"] == tiny_image.kernel_version
        assert (found["firmware"], found["secureboot"]) == ("uefi", "enabled")
        assert (found["tpm"], found["tpm_version"]) == ("present", "2")
        assert set(found["virtio"].split(",")) >= {"blk", "net", "rng"}
        assert found["mode"] == "stay"
        assert "warning" not in found, found
        # The kernel agrees with the efivar the guest read.
        assert "Secure boot enabled" in vm.log.read_text(errors="replace")

        pressed = time.monotonic()
        await vm.power_button()
        assert await vm.exited() == 0
        print(f"power button to exit: {time.monotonic() - pressed:.1f} s")
        assert markers(vm.log)["poweroff"] == "acpi"


def test_build_script_without_outdir_prints_usage() -> None:
    run = subprocess.run([str(BUILD_SCRIPT)], capture_output=True, text=True, timeout=30)
    assert run.returncode == 2
    assert "usage:" in run.stderr


def test_concurrent_callers_build_once_and_later_calls_reuse_it(
        tmp_path: Path, tiny_image: TinyImage) -> None:
    cache = tmp_path / "cache"
    # The session's .deb files make this build offline.
    shutil.copytree(tiny_image.kernel.parents[1] / "debs", cache / "debs")
    code = ("import os, sys; from tests.support.tiny import ensure_tiny_image as e; "
            "from pathlib import Path; print(os.stat(e(Path(sys.argv[1])).kernel).st_ino)")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(cache)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=110) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    inodes = {out.strip() for out, _ in outs}
    assert len(inodes) == 1, "the second caller rebuilt the image instead of waiting"
    manifest = json.loads((cache / "phyllome-tiny" / "manifest.json").read_text())
    assert manifest == json.loads(tiny_image.manifest.read_text())  # reproducible bytes
    again = subprocess.run([sys.executable, "-c", code, str(cache)], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=30)
    assert again.stdout.strip() in inodes
