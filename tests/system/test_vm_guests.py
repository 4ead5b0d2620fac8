"""Real guests: phyllome-tiny booted by the vm agent through the real libvirtd and QEMU (TCG).

The guest prints ``PHYLLOME-TINY: key=value`` markers on its serial console, which libvirt
also writes to the agent's console log; the tests read what the guest saw there.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from shared import contracts
from shared.agent import Agent
from shared.jobs import wait_job
from shared.messages import Empty
from shared.messages import hardware as hardware_api
from shared.messages.jobs import JobFinished
from shared.messages.vm import (
    Disk,
    Nic,
    VmClone,
    VmCreate,
    VmDelete,
    VmInfo,
    VmRef,
    VmShutdown,
    VmSpec,
)
from shared.natsserver import NatsServer
from tests.support.agents import REPO, agent_in_process
from tests.support.libvirt import (
    VmEvents,
    kill_libvirtd,
    markers,
    vm_events,
    wait_for_marker,
)
from tests.support.require import require_binary
from tests.support.tiny import TinyImage
from tests.support.wait import until

pytestmark = [pytest.mark.system, pytest.mark.timeout(240)]

HOST = "h1"
NVRAM_DIR = Path("/var/lib/libvirt/qemu/nvram")
SWTPM_DIR = Path("/var/lib/libvirt/swtpm")
BOOT_S = 90.0  # UEFI + Secure Boot under TCG on 2 shared cores takes a while


class Guests:
    """An agent on qemu:///system, with the tiny guest's files where QEMU can read them."""

    def __init__(self, agent: Agent, events: VmEvents, files: Path, tiny: TinyImage) -> None:
        self.agent, self.events, self.files, self.tiny = agent, events, files, tiny
        self.kernel = files / "vmlinuz"
        self.initrd = files / "initrd.gz"

    async def call(self, verb: str, req: Any, timeout: float = 30.0) -> Any:
        return await self.agent.bus.call(HOST, contracts.spec("vm", verb), req, timeout=timeout)

    def console(self, vm_uuid: str) -> Path:
        return self.files / "consoles" / f"{vm_uuid}.log"

    def blank_disk(self, name: str, size: int = 16 << 20) -> Path:
        path = self.files / name
        with open(path, "wb") as f:
            f.truncate(size)
        path.chmod(0o644)
        return path

    def direct(self, name: str, stay: bool = True, **kw: Any) -> VmSpec:
        cmdline = "console=ttyS0" + (" phyllome.stay=1" if stay else "")
        values: dict[str, Any] = {"memory_mib": 256, "vcpus": 1, "display": "none", **kw}
        return VmSpec(name=name, kernel=str(self.kernel), initrd=str(self.initrd),
                      cmdline=cmdline, **values)


def unique(prefix: str) -> str:
    return f"phy-{prefix}-{uuid.uuid4().hex[:6]}"


@contextlib.asynccontextmanager
async def guests(nats: NatsServer, state: Path, files: Path, tiny: TinyImage,
                 **overrides: Any) -> AsyncIterator[Guests]:
    for src in (tiny.kernel, tiny.initrd):
        shutil.copy(src, files / src.name)
        (files / src.name).chmod(0o644)
    extra = {"reconcile_s": 3600, "console_dir": str(files / "consoles"),
             "disk_dir": str(files / "disks"), "tiny_dir": str(files),
             **overrides.pop("extra", {})}
    settings = {"accelerator": "tcg", **overrides}
    async with agent_in_process("vm", nats.url, state, host=HOST,
                                libvirt_uri="qemu:///system", extra=extra,
                                **settings) as agent, vm_events(agent) as events:
        g = Guests(agent, events, files, tiny)
        try:
            yield g
        finally:
            await _remove_ours(g)


async def _remove_ours(g: Guests) -> None:
    """Delete what a failed test left behind: only VMs made from this test's files (their
    kernel or disks are under ``g.files``), not those of other tests on the same libvirtd."""
    await until("libvirt to be connected", lambda: g.agent.handlers.hv.connected, timeout=30,
                interval=0.1)
    ours = str(g.files) + "/"
    for dom in await g.agent.handlers.hv.domains():
        if dom.spec is not None and dom.spec.name.startswith("phy-") and \
                ours in msgspec.json.encode(dom.spec).decode():
            with contextlib.suppress(Exception):
                await g.call("delete", VmDelete(vm=dom.uuid, force=True))


def vnc_banner(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        return s.recv(12)


def spice_link_reply(port: int) -> bytes:
    """Send a SPICE link message (main channel) and read the reply's header."""
    link = struct.pack("<IBBIII", 0, 1, 0, 0, 0, 18)  # conn id, main channel, id, caps
    header = b"REDQ" + struct.pack("<III", 2, 2, len(link))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(header + link)
        return s.recv(16)


async def test_vm_uefi_secure_boot_tpm_virtio_consoles_and_lifecycle_events(
        nats_server: NatsServer, tmp_path: Path, guest_dir: Path, libvirtd: str,
        tiny_image: TinyImage) -> None:
    async with guests(nats_server, tmp_path, guest_dir, tiny_image) as g:
        disk = g.blank_disk("data.raw")
        spec = g.direct(unique("sb"), secure_boot=True, tpm="emulated-2.0", display="both",
                        disks=[Disk(path=str(disk))], nics=[Nic(kind="user")])
        info: VmInfo = await g.call("create", VmCreate(spec=spec))
        vm = info.uuid
        info = await g.call("start", VmRef(vm=vm))
        assert (info.state, info.accelerator) == ("running", "tcg")
        assert (await g.events.next(vm, event="started")).state == "running"
        seen = await wait_for_marker(g.console(vm), "ready", BOOT_S)
        assert (seen["firmware"], seen["secureboot"], seen["tpm"]) == \
            ("uefi", "enabled", "present")
        assert {"blk", "net"} <= set(seen["virtio"].split(","))

        info = await g.call("info", VmRef(vm=vm))
        assert info.vnc is not None and info.spice is not None
        assert info.vnc.host == "127.0.0.1" and info.uptime_s > 0
        assert await asyncio.to_thread(vnc_banner, info.vnc.port) == b"RFB 003.008\n"
        assert (await asyncio.to_thread(spice_link_reply, info.spice.port))[:4] == b"REDQ"

        await g.call("suspend", VmRef(vm=vm))
        assert (await g.events.next(vm, event="suspended")).state == "paused"
        await g.call("resume", VmRef(vm=vm))
        assert (await g.events.next(vm, event="resumed")).state == "running"

        g.console(vm).write_text("")  # the reboot prints the markers again
        await g.call("reboot", VmRef(vm=vm))
        assert (await g.events.next(vm, event="rebooted", timeout=60)).state == "running"
        await wait_for_marker(g.console(vm), "ready", BOOT_S)

        info = await g.call("shutdown", VmShutdown(vm=vm, timeout_s=180), timeout=210)
        assert info.state == "shutoff"
        ev = await g.events.next(vm, event="stopped")
        assert (ev.state, ev.reason) == ("shutoff", "shutdown")

        nvram = NVRAM_DIR / f"{spec.name}_VARS.fd"
        assert nvram.exists() and (SWTPM_DIR / vm).exists()
        await g.call("delete", VmDelete(vm=vm))
        assert (await g.events.next(vm, event="undefined")).state == "deleted"
        assert not nvram.exists() and not (SWTPM_DIR / vm).exists()
        assert disk.exists()


async def test_vm_boots_the_raw_disk_under_secure_boot_and_its_clone_boots(
        nats_server: NatsServer, tmp_path: Path, guest_dir: Path, libvirtd: str,
        tiny_image: TinyImage) -> None:
    async with guests(nats_server, tmp_path, guest_dir, tiny_image) as g:
        disk = guest_dir / "tiny.raw"
        subprocess.run(["cp", "--sparse=always", str(tiny_image.disk), str(disk)], check=True)
        disk.chmod(0o644)
        spec = VmSpec(name=unique("disk"), memory_mib=384, vcpus=1, secure_boot=True,
                      tpm="emulated-2.0", display="vnc", disks=[Disk(path=str(disk))])
        src = await g.call("create", VmCreate(spec=spec))
        await g.call("start", VmRef(vm=src.uuid))
        seen = await wait_for_marker(g.console(src.uuid), "ready", BOOT_S)
        assert (seen["secureboot"], seen["mode"]) == ("enabled", "stay")
        await g.call("destroy", VmRef(vm=src.uuid))
        assert (await g.events.next(src.uuid, event="stopped")).reason == "destroyed"

        accepted = await g.call("clone", VmClone(vm=src.uuid, name=unique("clone")))
        status = await _job(g, accepted.job_id)
        assert status.state == "succeeded", status.message
        clone = await g.call("info", VmRef(vm=str(status.result["uuid"])))
        assert clone.spec.disks[0].path != str(disk) and clone.spec.disks[0].owned
        assert (SWTPM_DIR / clone.uuid).exists()  # the TPM state came along
        await g.call("start", VmRef(vm=clone.uuid))
        seen = await wait_for_marker(g.console(clone.uuid), "ready", BOOT_S)
        assert (seen["secureboot"], seen["tpm"]) == ("enabled", "present")

        clone_disk = Path(clone.spec.disks[0].path)
        await g.call("delete", VmDelete(vm=clone.uuid, force=True, delete_disks=True))
        await g.call("delete", VmDelete(vm=src.uuid))
        for vm in (src, clone):
            assert not (NVRAM_DIR / f"{vm.name}_VARS.fd").exists()
            assert not (SWTPM_DIR / vm.uuid).exists()
        assert not clone_disk.exists() and disk.exists()


async def _job(g: Guests, job_id: str) -> JobFinished:
    return await wait_job(g.agent.bus, HOST, "vm", job_id, timeout=120)


async def test_vm_bios_guest_powers_itself_off(
        nats_server: NatsServer, tmp_path: Path, guest_dir: Path, libvirtd: str,
        tiny_image: TinyImage) -> None:
    async with guests(nats_server, tmp_path, guest_dir, tiny_image) as g:
        info = await g.call("create", VmCreate(spec=g.direct(
            unique("bios"), stay=False, firmware="bios", disks=[Disk(path=str(
                g.blank_disk("b.raw")))])))
        await g.call("start", VmRef(vm=info.uuid))
        ev = await g.events.next(info.uuid, event="stopped", timeout=BOOT_S)
        assert (ev.state, ev.reason) == ("shutoff", "shutdown")
        seen = markers(g.console(info.uuid))
        assert (seen["firmware"], seen["secureboot"], seen["tpm"], seen["mode"]) == \
            ("bios", "disabled", "absent", "poweroff")
        assert "blk" in seen["virtio"]


async def test_vm_agent_reconnects_after_libvirtd_restart_and_emits_missed_change(
        nats_server: NatsServer, tmp_path: Path, guest_dir: Path, libvirtd: str,
        tiny_image: TinyImage) -> None:
    async with guests(nats_server, tmp_path, guest_dir, tiny_image) as g:
        info = await g.call("create", VmCreate(spec=g.direct(unique("crash"), firmware="bios")))
        await g.call("start", VmRef(vm=info.uuid))
        await wait_for_marker(g.console(info.uuid), "ready", BOOT_S)
        pid = int(Path(f"/run/libvirt/qemu/{info.name}.pid").read_text())

        kill_libvirtd()
        os.kill(pid, 9)  # the guest dies while nobody watches
        subprocess.run(["libvirtd", "-d"], check=True)

        ev = await g.events.next(info.uuid, event="reconciled", timeout=60)
        assert (ev.state, ev.missed) == ("shutoff", True)
        assert g.agent.handlers.hv.connected
        info = await g.call("info", VmRef(vm=info.uuid))
        assert info.state == "shutoff"
        await g.call("start", VmRef(vm=info.uuid))  # and it works again
        assert (await g.events.next(info.uuid, event="started")).state == "running"


async def test_vm_accelerator_auto_probes_kvm_and_falls_back_to_tcg(
        nats_server: NatsServer, tmp_path: Path, guest_dir: Path, libvirtd: str,
        tiny_image: TinyImage) -> None:
    """On this kind of host a Linux guest hangs under KVM: auto must pick TCG, once a boot."""
    async with agent_in_process("hardware", nats_server.url, tmp_path / "hw", host=HOST,
                                sysfs_root="/sys") as hw, \
            guests(nats_server, tmp_path, guest_dir, tiny_image, accelerator="auto",
                   extra={"kvm_probe_deadline_s": 5}) as g:
        decision = g.agent.details.accelerator
        assert decision is not None
        probe = "passed" if decision.kvm_usable else "failed"
        async def carried() -> bool:  # the host capabilities carry the verdict
            caps = await hw.bus.call(HOST, hardware_api.CAPS, Empty())
            return bool(caps.kvm_boot_probe == probe)

        await until(f"the host capabilities to say the probe {probe}", carried, timeout=20,
                    interval=0.1)
        assert decision.accelerator == ("kvm" if decision.kvm_usable else "tcg")
        info = await g.call("create", VmCreate(spec=g.direct(unique("auto"), firmware="bios")))
        assert info.accelerator == decision.accelerator
        if not decision.kvm_usable:  # this kind of machine (FACTS.md)
            assert "KVM unusable" in decision.note and "KVM unusable" in info.accelerator_note
        await g.call("delete", VmDelete(vm=info.uuid))
    cached = (tmp_path / "vm" / "accelerator.json").read_text()
    assert f'"kvm_usable":{str(decision.kvm_usable).lower()}' in cached


CONSOLE_DOC = REPO / "docs" / "console.md"
SCREEN_START, SCREEN_END = "<!-- screen: begin -->\n```text\n", "```\n<!-- screen: end -->"


def tmux(socket_name: str, *argv: str) -> str:
    return subprocess.run(["tmux", "-L", socket_name, *argv], check=True, capture_output=True,
                          text=True, timeout=30).stdout


async def test_cli_on_a_guest_that_ignores_acpi_stop_says_so_and_its_serial_console_attaches(
        nats_server: NatsServer, tmp_path: Path, guest_dir: Path, libvirtd: str,
        tiny_image: TinyImage) -> None:
    """Issue 19 with one booted guest that never hears the power button (``acpi=off``, like a
    guest still in its firmware): ``vm console`` in a real terminal (tmux) attaches to the
    serial console and Ctrl-] leaves it; ``vm stop`` says the guest ignored the request and
    exits 1, ``--force`` powers it off. ``PHYLLOME_REGENERATE=1`` writes the screen into
    docs/console.md."""
    require_binary("tmux")
    env = {**os.environ, "PHYLLOME_HOST": HOST, "PHYLLOME_NATS_URL": nats_server.url,
           "PHYLLOME_LIBVIRT_URI": libvirtd}
    async with guests(nats_server, tmp_path, guest_dir, tiny_image) as g:
        spec = g.direct(unique("acpi"))
        spec = msgspec.structs.replace(spec, cmdline=f"{spec.cmdline} acpi=off")
        info = await g.call("create", VmCreate(spec=spec))
        sock = f"phyllome-{info.uuid[:8]}"
        script = (f"cd {REPO} && {sys.executable} -m cli.main vm start {spec.name} >/dev/null "
                  f"&& {sys.executable} -m cli.main vm console {spec.name}; "
                  "echo \"[phyllome vm console exited with $?]\"; sleep 600")
        tmux(sock, "-f", "/dev/null", "new-session", "-d", "-s", "console", "-x", "100",
             "-y", "32", "env", *(f"{k}={v}" for k, v in env.items()
                                  if k.startswith(("PHYLLOME_", "PATH", "PYTHON"))),
             "sh", "-c", script)
        try:
            await until("the guest's markers on the attached console",
                        lambda: "PHYLLOME-TINY: ready" in tmux(sock, "capture-pane", "-p"),
                        timeout=BOOT_S, interval=0.5)
            assert "Escape character is ^]" in tmux(sock, "capture-pane", "-p", "-S", "-")
            assert "PHYLLOME-TINY: mode=stay" in tmux(sock, "capture-pane", "-p")
            tmux(sock, "send-keys", "-t", "console", "C-]")
            await until("Ctrl-] to leave the console",
                        lambda: "[phyllome vm console exited with 0]" in tmux(
                            sock, "capture-pane", "-p"), timeout=30, interval=0.2)
            left = tmux(sock, "capture-pane", "-p", "-S", "-")
        finally:
            subprocess.run(["tmux", "-L", sock, "kill-server"], capture_output=True)

        cli = [sys.executable, "-m", "cli.main", "vm"]
        stop = await asyncio.to_thread(subprocess.run, [*cli, "stop", spec.name, "--wait", "5"],
                                       cwd=REPO, env=env, capture_output=True, text=True)
        assert stop.returncode == 1, stop.stdout + stop.stderr
        assert f"VM {spec.name} is still running after 5 s: the guest ignored the ACPI " \
               "power button" in stop.stderr
        assert f"`phyllome vm stop {spec.name} --force` powers it off" in stop.stderr
        assert (await g.call("info", VmRef(vm=info.uuid))).state == "running"
        forced = await asyncio.to_thread(
            subprocess.run, [*cli, "stop", spec.name, "--wait", "2", "--force", "--json"],
            cwd=REPO, env=env, capture_output=True, text=True)
        assert forced.returncode == 0, forced.stderr
        assert json.loads(forced.stdout)["state"] == "shutoff"
        assert "the guest ignored the ACPI power button for 2 s; powered off hard" in \
            forced.stderr
    if os.environ.get("PHYLLOME_REGENERATE") == "1":
        doc = CONSOLE_DOC.read_text()
        head, rest = doc.split(SCREEN_START)
        _old, tail = rest.split(SCREEN_END)
        screen = [line.rstrip() for line in left.rstrip().splitlines()]
        top = next(i for i, line in enumerate(screen) if "Escape character" in line) + 1
        cut = len(screen) - 20  # the kernel's boot messages between, elided
        shown = "\n".join([*screen[:top], f"[... {cut - top} lines of the guest's boot ...]",
                           *screen[cut:]]).replace(spec.name, "demo")
        CONSOLE_DOC.write_text(f"{head}{SCREEN_START}$ phyllome vm console demo\n{shown}\n"
                               f"{SCREEN_END}{tail}")
