"""Backup of a running real guest on one host of a three-host cluster, restored on another.

Hosts a and b each run their own libvirtd (own mount namespace) and QEMU under TCG; c keeps
the NATS cluster at three servers. The phyllome-tiny guest boots on a under UEFI Secure Boot
with an emulated TPM and stays up; it counts its boots on its disk (``PHYLLOME-COUNTER n``)
and prints the TPM's resetCount, which the TPM state keeps (one more each boot), so each boot
shows which disk and which TPM state it found. ``phyllome vm backup`` archives it while it
runs; a is then rid of it, ``phyllome vm restore --host b`` brings it back on b with its
NVRAM and TPM state byte for byte, and it boots there from the backed-up disk and TPM state.
An archive with one flipped byte is refused by b and leaves nothing there.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.test_cluster_migration import guest_state
from tests.support.libvirt import wait_for_marker
from tests.support.netns import Cluster, Hosts
from tests.support.tiny import TinyImage

pytestmark = pytest.mark.cluster
BOOT_S = 240.0

SETUP = """
from shared.messages.storage import CreateVolume
from shared.messages.vm import Disk, VmCreate, VmRef, VmSpec
async def main(bus):
    vol = await bus.call("a", storage_api.CREATE, CreateVolume(name="g1-disk0",
                                                                 size_bytes=16 << 20))
    with open(vol.path, "r+b") as f:
        f.write(b"PHYLLOME-COUNTER 0\\n")
    info = await bus.call("a", vm_api.CREATE, VmCreate(spec=VmSpec(
        name="g1", memory_mib=256, vcpus=1, display="none", secure_boot=True,
        tpm="emulated-2.0", kernel=KERNEL, initrd=INITRD,
        cmdline="console=ttyS0 phyllome.stay=1",
        disks=[Disk(volume="g1-disk0", owned=True)])), timeout=60)
    await bus.call("a", vm_api.START, VmRef(vm="g1"), timeout=60)
    return {"uuid": info.uuid}
"""


def booted(log: Path) -> dict[str, str]:
    """The markers of the boot the console ``log`` shows, once the guest is ready."""
    return asyncio.run(wait_for_marker(log, "ready", BOOT_S))


def cli_json(cluster: Cluster, host: str, *args: str) -> Any:
    done = cluster.cli(host, *args, "--json", timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


def vms_on(cluster: Cluster, host: str) -> dict[str, str]:
    listed = cli_json(cluster, host, "vm", "list", "--host", host)
    return {v["spec"]["name"]: v["state"] for v in listed["vms"]}


def tree(top: Path) -> list[str]:
    """Every file and folder under ``top`` (hidden ones too), relative."""
    return sorted(str(Path(d, n).relative_to(top)) for d, dirs, files in os.walk(top)
                  for n in dirs + files)


@pytest.mark.timeout(600)
def test_a_running_guest_backed_up_on_a_boots_on_b_and_a_damaged_archive_is_refused(
        tmp_path: Path, tiny_image: TinyImage) -> None:
    files = tmp_path / "files"
    files.mkdir()
    kernel, initrd = tiny_image.boot_files_in(files)
    backups = tmp_path / "backups"
    backups.mkdir()
    with Hosts(tmp_path / "ns", ("a", "b", "c")) as hosts:
        uris = {n: hosts[n].start_libvirtd() for n in ("a", "b")}
        cluster = Cluster(hosts, tmp_path, libvirt=uris, agents={"c": "hardware,storage"})
        cluster.wait_up()
        made = cluster.py("a", SETUP.replace("KERNEL", repr(str(kernel))).replace(
            "INITRD", repr(str(initrd))), timeout=120)
        console = Path("vm") / "consoles" / f"{made['uuid']}.log"
        first = booted(tmp_path / "a" / console)
        assert (first["secureboot"], first["tpm"], first["disk_counter"]) == (
            "enabled", "present", "0")
        resets = int(first["tpm_resets"])

        # Backed up while it runs (the guest is paused only for the snapshot's copies).
        backup = cli_json(cluster, "a", "vm", "backup", "g1", "--to", str(backups),
                          "--host", "a")
        archive = Path(backup["result"]["archive"])
        assert archive.parent == backups and backup["result"]["paused_s"] > 0
        assert vms_on(cluster, "a") == {"g1": "running"}
        at_backup = guest_state(hosts["a"].workdir, made["uuid"])
        assert at_backup["nvram"] and at_backup["tpm"], at_backup

        # Host a loses it; b brings it back from the archive: same VM, same NVRAM and TPM.
        gone = cluster.cli("a", "vm", "delete", "g1", "--force", "--delete-disks", "--host",
                           "a", timeout=120)
        assert gone.returncode == 0, gone.stdout + gone.stderr
        restored = cli_json(cluster, "b", "vm", "restore", str(archive), "--host", "b")
        assert (restored["result"]["name"], restored["result"]["uuid"]) == ("g1", made["uuid"])
        assert guest_state(hosts["b"].workdir, made["uuid"]) == at_backup
        started = cluster.cli("b", "vm", "start", "g1", "--host", "b", timeout=120)
        assert started.returncode == 0, started.stdout + started.stderr
        second = booted(tmp_path / "b" / console)
        # The disk as backed up (the first boot had counted itself), the TPM state one boot
        # on, the Secure Boot keys of the NVRAM.
        assert (second["secureboot"], second["tpm"], second["disk_counter"],
                second["tpm_resets"]) == ("enabled", "present", "1", str(resets + 1))

        # One flipped byte: b refuses the archive and keeps nothing of it.
        damaged = bytearray(archive.read_bytes())
        damaged[len(damaged) // 2] ^= 0x01
        archive.write_bytes(bytes(damaged))
        pools = tmp_path / "b" / "pools"
        before = tree(pools)
        refused = cluster.cli("b", "vm", "restore", str(archive), "--name", "g1-copy",
                              "--host", "b", timeout=180)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert "damaged" in refused.stderr, refused.stderr
        assert tree(pools) == before
        assert vms_on(cluster, "b") == {"g1": "running"}
