"""Cold migration of a real phyllome-tiny guest between two hosts of a three-host cluster.

Hosts a and b each run their own libvirtd (in their own mount namespace) and QEMU under TCG;
c keeps the NATS cluster at three servers. The UEFI guest with an emulated TPM boots on a
and powers off; ``phyllome vm migrate`` moves it to b while the link of host a is cut and
restored mid-transfer (the stream resumes); its NVRAM and TPM state arrive byte for byte;
on b it boots again from the moved disk and still sees its TPM.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from pathlib import Path

import pytest

from tests.support.netns import Cluster, Hosts
from tests.support.tiny import TinyImage

pytestmark = pytest.mark.cluster
SENT = re.compile(r"sending disk 1/1 \S+ (\d+)%")

BOOT = """
from shared.messages import storage as storage_api
from shared.messages import vm as vm_api
from shared.messages.storage import CreateVolume, VolumeQuery
from shared.messages.vm import Disk, VmCreate, VmRef, VmSpec
async def boot(bus, host, name):
    await bus.call(host, vm_api.START, VmRef(vm=name), timeout=60)
    deadline = time.monotonic() + 180
    while (await bus.call(host, vm_api.INFO, VmRef(vm=name))).state != "shutoff":
        assert time.monotonic() < deadline, "the guest did not power off"
        await asyncio.sleep(0.5)
"""

SETUP = BOOT + """
async def main(bus):
    vol = await bus.call("a", storage_api.CREATE, CreateVolume(name="g1-disk0",
                                                                 size_bytes=64 << 20))
    with open(vol.path, "r+b") as f:
        f.seek(1 << 20)
        f.write(bytes(range(256)) * 4096 * 12)  # 12 MiB of data in 64 MiB
    info = await bus.call("a", vm_api.CREATE, VmCreate(spec=VmSpec(
        name="g1", memory_mib=256, vcpus=1, firmware="uefi", tpm="emulated-2.0",
        display="none",
        kernel=KERNEL, initrd=INITRD, cmdline="console=ttyS0",
        disks=[Disk(pool="default", volume="g1-disk0", owned=True)])), timeout=60)
    await boot(bus, "a", "g1")
    digest = (await bus.call("a", storage_api.INFO, VolumeQuery(name="g1-disk0",
                                                                sha256=True))).sha256
    return {"uuid": info.uuid, "sha256": digest}
"""

MIGRATE = """
from shared.jobs import wait_job
from shared.messages import vm as vm_api
from shared.messages.vm import VmMigrate
async def main(bus):
    accepted = await bus.call("a", vm_api.MIGRATE, VmMigrate(vm="g1", to="b",
                                                              bwlimit_bytes_s=1 << 20))
    async def show(p):
        print("progress", p.done, p.total, p.message, flush=True)
    st = await wait_job(bus, "a", "vm", accepted, timeout=280, on_progress=show)
    return st.result if st.state == "succeeded" else {"error": st.message}
"""

AFTER = BOOT + """
from shared.errors import PhyError
async def main(bus):
    vm = await bus.call("b", vm_api.INFO, VmRef(vm="g1"))
    digest = (await bus.call("b", storage_api.INFO, VolumeQuery(name="g1-disk0",
                                                                sha256=True))).sha256
    await boot(bus, "b", "g1")
    try:
        await bus.call("a", vm_api.INFO, VmRef(vm="g1"))
        on_a = True
    except PhyError:
        on_a = False
    return {"uuid": vm.uuid, "sha256": digest, "on_a": on_a}
"""


def markers(log: Path) -> dict[str, str]:
    out = {}
    for line in log.read_text(errors="replace").splitlines():
        if "PHYLLOME-TINY: " in line:
            key, _, value = line.split("PHYLLOME-TINY: ", 1)[1].strip().partition("=")
            out[key] = value
    return out


def guest_state(host_dir: Path, uuid: str) -> dict[str, str]:
    """sha256 of the guest's NVRAM file and TPM state as that host's libvirt keeps them."""
    lib = host_dir / "libvirt" / "var-lib-libvirt"
    out = {}
    for key, pattern in (("nvram", "qemu/nvram/g1_VARS.fd"),
                         ("tpm", f"swtpm/{uuid}/tpm2/tpm2-00.permall")):
        path = lib / pattern
        out[key] = hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else ""
    return out


@pytest.mark.timeout(400)
def test_cold_migration_of_a_real_guest_across_a_cut_link(tmp_path: Path,
                                                          tiny_image: TinyImage) -> None:
    files = tmp_path / "files"
    files.mkdir()
    for src in (tiny_image.kernel, tiny_image.initrd):
        shutil.copy(src, files / src.name)
    with Hosts(tmp_path / "ns", ("a", "b", "c")) as hosts:
        uris = {n: hosts[n].start_libvirtd() for n in ("a", "b")}
        cluster = Cluster(hosts, tmp_path, libvirt=uris, agents={"c": "hardware,storage"})
        cluster.wait_up()
        setup = SETUP.replace("KERNEL", repr(str(files / tiny_image.kernel.name))).replace(
            "INITRD", repr(str(files / tiny_image.initrd.name)))
        made = cluster.py("a", setup, timeout=300)
        console = Path("vm") / "consoles" / f"{made['uuid']}.log"
        first = markers(tmp_path / "a" / console)
        assert first.get("mode") == "poweroff" and "ready" in first and "vda" in first["disks"]
        assert first["firmware"] == "uefi" and first["tpm"] == "present"
        state_a = guest_state(hosts["a"].workdir, made["uuid"])
        assert state_a["nvram"] and state_a["tpm"], state_a

        log = tmp_path / "migrate.log"
        job = cluster.py_background("a", MIGRATE, log)
        deadline = time.monotonic() + 120
        while not [int(p) for p in SENT.findall(log.read_text()) if int(p) > 0]:
            assert job.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        hosts.cut("a")
        # the link stays down until b's storage agent sees the stream stall
        stalled = """
from shared.messages import Empty
from shared.messages import storage as storage_api
from shared.messages import vm as vm_api
async def main(bus):
    inc = await bus.call("b", storage_api.INCOMING, Empty())
    return max((t.idle_s for t in inc.transfers), default=0.0)
"""
        deadline = time.monotonic() + 60
        while cluster.py("b", stalled) < 2.0:
            assert time.monotonic() < deadline, "the transfer did not stall"
        hosts.restore("a")
        job.wait(timeout=300)
        result = json.loads(log.read_text().splitlines()[-1])
        assert "error" not in result, log.read_text()
        assert result["to"] == "b" and result["disks"] == ["default/g1-disk0"]

        assert guest_state(hosts["b"].workdir, made["uuid"]) == state_a  # before it boots
        after = cluster.py("b", AFTER, timeout=300)
        assert after == {"uuid": made["uuid"], "sha256": made["sha256"], "on_a": False}
        second = markers(tmp_path / "b" / console)
        assert second.get("mode") == "poweroff" and "ready" in second
        assert second["disks"] == first["disks"]
        assert second["firmware"] == "uefi" and second["tpm"] == "present"
