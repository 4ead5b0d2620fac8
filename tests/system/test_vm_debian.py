"""A real Debian 12 guest (phyllome-debian) on the real libvirtd and QEMU (TCG), as a user
makes it:

    phyllome images pull phyllome-debian
    phyllome vm create deb --image phyllome-debian --secure-boot --tpm \\
        --user ana --ssh-key key.pub --hostname deb-guest
    phyllome vm start deb

then, on the ``vm.addresses_changed`` event with the guest agent's address, ``ssh`` over the
NAT network ``phyllome``: the host name is the one given, systemd finished its boot with no
failed cloud-init unit, and the guest sees Secure Boot on. How long create -> SSH takes is
measured in bench/bench_vm_debian.py, not asserted here.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from shared import subjects
from shared.codec import decode
from shared.messages.vm import VmAddressesChanged
from shared.natsserver import NatsServer
from tests.support.agents import REPO, agent_in_process
from tests.support.debian import DebianImage
from tests.support.require import require
from tests.support.wait import until

pytestmark = [pytest.mark.system, pytest.mark.timeout(2400)]  # a first build too

BOOT_S = 900.0  # start -> ssh took 148 s under TCG on 2 cores at load 12; room for worse
SECURE_BOOT_VAR = "/sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c"


def install_builtin(image: DebianImage, state: Path) -> Path:
    """The image as ``make up`` leaves it: ``<state>/images/builtin/phyllome-debian``."""
    folder = state / "images" / "builtin" / "phyllome-debian"
    folder.mkdir(parents=True)
    for f in (image.disk, image.manifest):
        subprocess.run(["cp", "--reflink=auto", "--sparse=always", str(f),
                        str(folder / f.name)], check=True)
    return folder


async def phyllome(url: str, *argv: str, timeout: float = 300) -> tuple[int, str, str]:
    env = {**os.environ, "PHYLLOME_HOST": "h1", "PHYLLOME_NATS_URL": url, "COLUMNS": "200"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli.main", *argv, cwd=REPO, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def ssh_key(folder: Path) -> Path:
    key = folder / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "phyllome-test",
                    "-f", str(key)], check=True)
    return key


def ssh_argv(key: Path, user: str, address: str, *command: str) -> list[str]:
    return ["ssh", "-i", str(key), "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
            "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR", f"{user}@{address}", *command]


async def ssh(key: Path, user: str, address: str, *command: str,
              timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(subprocess.run, ssh_argv(key, user, address, *command),
                                   capture_output=True, text=True, timeout=timeout)


async def first_ipv4(events: asyncio.Queue[VmAddressesChanged], name: str,
                     deadline: float) -> str:
    """The guest agent's first IPv4 address of VM ``name`` (not loopback), from the events."""
    while True:
        ev = await asyncio.wait_for(events.get(), max(1.0, deadline - time.monotonic()))
        if ev.name != name or ev.source != "agent":
            continue
        for a in ev.addresses:
            if a.family == "ipv4" and not ipaddress.ip_address(a.address).is_loopback:
                return a.address


async def test_vm_debian_cloud_init_guest_answers_ssh_with_its_hostname_and_secure_boot(
        nats_server: NatsServer, guest_dir: Path, libvirtd: str, tmp_path: Path,
        debian_image: DebianImage) -> None:
    require(shutil.which("dnsmasq") is not None, "dnsmasq (package dnsmasq-base)")
    require(shutil.which("ssh") is not None, "ssh (package openssh-client)")
    state = guest_dir  # QEMU must reach the storage pool under it
    install_builtin(debian_image, state)
    key = ssh_key(tmp_path)
    url = nats_server.url
    name, user, hostname = f"deb-{os.getpid()}", "ana", "deb-guest"
    events: asyncio.Queue[VmAddressesChanged] = asyncio.Queue()
    async with agent_in_process("catalogue", url, state, extra={
                "osinfo_dir": "", "probe_interval_s": 0, "auto_pull": []}), \
            agent_in_process("storage", url, state,
                             extra={"import_dirs": [str(state / "images" / "pool")]}), \
            agent_in_process("vm", url, state, libvirt_uri=libvirtd, accelerator="tcg",
                             extra={"reconcile_s": 3600, "address_poll_s": 2}) as vm_agent:

        async def got(msg: Any) -> None:
            events.put_nowait(decode(msg.data, VmAddressesChanged))

        sub = await vm_agent.bus.nc.subscribe(
            subjects.event("h1", "vm", "addresses") + ".*", cb=got)
        rc, out, err = await phyllome(url, "images", "pull", "phyllome-debian")
        assert rc == 0, err
        rc, out, err = await phyllome(
            url, "vm", "create", name, "--image", "phyllome-debian", "--secure-boot", "--tpm",
            "--memory", "1G", "--cpus", "2", "--display", "none", "--user", user,
            "--ssh-key", f"{key}.pub", "--hostname", hostname)
        assert rc == 0, err
        console = state / "vm" / "consoles"
        try:
            started = time.monotonic()
            rc, out, err = await phyllome(url, "vm", "start", name)
            assert rc == 0, err
            deadline = started + BOOT_S
            try:
                address = await first_ipv4(events, name, deadline)
            except TimeoutError:
                raise AssertionError(f"no guest-agent address in {BOOT_S:.0f} s; console:\n"
                                     + _console_tail(console)) from None
            addressed = time.monotonic() - started

            async def answers() -> str:
                done = await ssh(key, user, address, "hostname", timeout=60)
                return done.stdout.strip() if done.returncode == 0 else ""

            answered: str = await until(
                f"ssh {user}@{address} to answer hostname {hostname}", answers,
                timeout=max(30.0, deadline - time.monotonic()), interval=2)
            assert answered == hostname
            print(f"\nphyllome-debian under TCG: address after {addressed:.0f} s, ssh after "
                  f"{time.monotonic() - started:.0f} s")

            running = await ssh(key, user, address, "systemctl", "is-system-running", "--wait",
                                timeout=max(60.0, deadline - time.monotonic()))
            failed = await ssh(key, user, address, "systemctl", "list-units", "--failed",
                               "--plain", "--no-legend")
            assert running.stdout.strip() in ("running", "degraded"), \
                (running.stdout, failed.stdout)
            assert "cloud" not in failed.stdout, failed.stdout
            status = await ssh(key, user, address, "cloud-init", "status", "--long")
            assert "status: done" in status.stdout, status.stdout + status.stderr
            sb = await ssh(key, user, address, "od", "-An", "-tu1", SECURE_BOOT_VAR)
            assert sb.returncode == 0 and sb.stdout.split()[-1] == "1", sb.stdout + sb.stderr
            tpm = await ssh(key, user, address, "cat", "/sys/class/tpm/tpm0/tpm_version_major")
            assert tpm.stdout.strip() == "2", tpm.stdout + tpm.stderr
            blame = await ssh(key, user, address, "systemd-analyze", "blame")
            print("slowest units:\n" + "\n".join(blame.stdout.splitlines()[:10]))
        finally:
            await sub.unsubscribe()
            for log in console.glob("*.log"):  # for a failure's post-mortem
                shutil.copy(log, tmp_path / "console.log")
            rc, out, err = await phyllome(url, "vm", "delete", name, "--force",
                                          "--delete-disks")
        assert rc == 0, err


def _console_tail(folder: Path) -> str:
    logs = sorted(folder.glob("*.log"))
    return logs[-1].read_text(errors="replace")[-4000:] if logs else "(no console log)"
