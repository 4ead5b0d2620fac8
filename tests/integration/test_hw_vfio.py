"""VFIO bind/release, rollback, mdev and SR-IOV on fixture trees: the exact sysfs writes.

``TreeKernel`` plays the kernel's part after each write (a driver link moving after
``drivers_probe``) and can make the n-th write to a file fail, to exercise rollback.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import pytest

from services.hardware.inventory import Inventory
from services.hardware.operations import Operations
from services.hardware.sysfs import Sysfs
from shared.errors import (
    BackendError,
    BadRequest,
    Conflict,
    Forbidden,
    InsufficientResources,
    InvalidName,
    NotFound,
    Timeout,
    Unavailable,
)
from shared.messages.hardware import BindRequest, MdevCreate
from tests.support.sysfs_tree import FIXTURES, TreeBuilder, TreeKernel, build
from tests.support.wait import until

GPU = ["0000:01:00.0", "0000:01:00.1", "0000:01:00.2", "0000:01:00.3"]
ORIG = {"0000:01:00.0": "nvidia", "0000:01:00.1": "snd_hda_intel",
        "0000:01:00.2": "xhci_hcd", "0000:01:00.3": "nvidia-gpu"}


class Rig:
    def __init__(self, tmp_path: Path, fixture: str = "intel-desktop",
                 fail: dict[str, int] | None = None) -> None:
        host = FIXTURES[fixture]()
        self.builder: TreeBuilder = build(tmp_path / "sys", host)
        self.root = self.builder.root
        self.kernel = TreeKernel(self.builder, fail)
        self.proc = tmp_path / "proc"
        self.proc.mkdir()
        self.fs = Sysfs(str(self.root), root_dev=host.root_dev, proc_root=str(self.proc),
                        after_write=self.kernel)
        self.inv = Inventory(self.fs)
        self.inv.scan()
        self.state = tmp_path / "state"
        self.ops = Operations(self.fs, self.inv, self.state)
        self.progress: list[tuple[int, int, str]] = []

    async def report(self, done: int, total: int, message: str) -> None:
        self.progress.append((done, total, message))

    def driver(self, addr: str) -> str:
        link = self.root / "bus/pci/devices" / addr / "driver"
        return os.readlink(link).rsplit("/", 1)[-1] if link.is_symlink() else ""

    def override(self, addr: str) -> str:
        text = (self.root / "bus/pci/devices" / addr / "driver_override").read_text().strip()
        return "" if text == "(null)" else text

    async def bind(self, address: str, **kw: bool) -> dict[str, object]:
        devices = self.ops.plan_bind(BindRequest(address=address, **kw))
        return await self.ops.bind(devices, self.report, single_gpu=kw.get("single_gpu", False))

    async def release(self, address: str) -> dict[str, object]:
        key, binding = self.ops.plan_release(address)
        return await self.ops.release(key, binding, self.report)

    def vm_holds(self, group: int, pid: int = 4242, name: str = "win10") -> None:
        d = self.proc / str(pid)
        (d / "fd").mkdir(parents=True)
        (d / "fd/17").symlink_to(f"/dev/vfio/{group}")
        (d / "cmdline").write_bytes(b"qemu-system-x86_64\0-name\0guest=" + name.encode()
                                    + b",debug-threads=on\0")


def bind_writes(addr: str, orig: str) -> list[tuple[str, str]]:
    return [(f"bus/pci/devices/{addr}/driver_override", "vfio-pci"),
            (f"bus/pci/drivers/{orig}/unbind", addr),
            ("bus/pci/drivers_probe", addr)]


def undo_writes(addr: str, orig: str) -> list[tuple[str, str]]:
    return [("bus/pci/drivers/vfio-pci/unbind", addr),
            (f"bus/pci/devices/{addr}/driver_override", "\n"),
            (f"bus/pci/drivers/{orig}/bind", addr)]


async def test_bind_moves_the_gpu_and_its_companions_with_exact_writes(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    result = await rig.bind("01:00.0")
    assert rig.kernel.writes == [w for a in GPU for w in bind_writes(a, ORIG[a])]
    assert {a: rig.driver(a) for a in GPU} == dict.fromkeys(GPU, "vfio-pci")
    assert rig.driver("0000:00:01.0") == "pcieport"  # the root port stays with the host
    assert result["devices"] == GPU and result["original_drivers"] == ORIG
    assert len(result["steps"]) == 12  # type: ignore[arg-type]
    assert rig.progress[-1] == (4, 4, "0000:01:00.3 -> vfio-pci")
    assert rig.inv.device("0000:01:00.1").driver == "vfio-pci"
    assert '"state":"bound"' in (rig.state / "vfio.json").read_text()


async def test_release_restores_each_original_driver(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    await rig.bind("0000:01:00.1")
    rig.kernel.writes.clear()
    result = await rig.release("0000:01:00.0")
    assert rig.kernel.writes == [w for a in reversed(GPU) for w in undo_writes(a, ORIG[a])]
    assert {a: rig.driver(a) for a in GPU} == ORIG
    assert {rig.override(a) for a in GPU} == {""}
    assert result["drivers"] == ORIG
    assert "0000:01:00.0" not in (rig.state / "vfio.json").read_text()


async def test_release_survives_a_restart_of_the_agent(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    await rig.bind("0000:01:00.0")
    fresh = Operations(rig.fs, rig.inv, rig.state)  # a new process reads vfio.json
    key, binding = fresh.plan_release("0000:01:00.2")
    await fresh.release(key, binding, rig.report)
    assert {a: rig.driver(a) for a in GPU} == ORIG


async def test_a_failed_probe_rolls_back_every_step_done(tmp_path: Path) -> None:
    rig = Rig(tmp_path, fail={"bus/pci/drivers_probe": 3})  # the third device fails
    with pytest.raises(BackendError) as err:
        await rig.bind("0000:01:00.0")
    msg = err.value.message
    assert "failed at 'probe 0000:01:00.2'" in msg and "Input/output error" in msg
    assert "rolled back 8 step(s)" in msg
    done = [w for a in GPU[:3] for w in bind_writes(a, ORIG[a])]
    undo = [("bus/pci/drivers/xhci_hcd/bind", "0000:01:00.2")]  # it had no driver any more
    undo = [("bus/pci/devices/0000:01:00.2/driver_override", "\n"), *undo]
    undo += [w for a in reversed(GPU[:2]) for w in undo_writes(a, ORIG[a])]
    assert rig.kernel.writes == done + undo
    assert {a: rig.driver(a) for a in GPU} == ORIG
    assert {rig.override(a) for a in GPU} == {""}
    assert (rig.state / "vfio.json").read_text() == "{}"


async def test_a_failed_undo_is_reported(tmp_path: Path) -> None:
    rig = Rig(tmp_path, fail={"bus/pci/drivers_probe": 2, "drivers/nvidia/bind": 1})
    with pytest.raises(BackendError, match=r"could NOT undo: 0000:01:00.0: writing "
                                           r"'0000:01:00.0' to .*nvidia/bind failed"):
        await rig.bind("0000:01:00.0")
    assert rig.driver("0000:01:00.1") == "snd_hda_intel"


async def test_a_failed_override_write_is_rolled_back(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    (rig.root / "bus/pci/devices/0000:01:00.3/driver_override").write_text("(null)\n")
    rig.kernel.fail["devices/0000:01:00.3/driver_override"] = 1
    with pytest.raises(BackendError, match="set driver_override of 0000:01:00.3"):
        await rig.bind("0000:01:00.0")
    assert {a: rig.driver(a) for a in GPU} == ORIG


async def test_cancelling_a_bind_rolls_it_back(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    started = asyncio.Event()

    async def slow(done: int, total: int, message: str) -> None:
        started.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(rig.ops.bind(rig.ops.plan_bind(BindRequest(
        address="0000:01:00.0")), slow))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert {a: rig.driver(a) for a in GPU} == ORIG


async def test_an_interrupted_bind_is_rolled_back_at_the_next_start(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    addr = "0000:01:00.0"
    (rig.state).mkdir()
    (rig.state / "vfio.json").write_text(
        '{"1": {"state": "binding", "drivers": {"0000:01:00.0": "nvidia"}}}')
    for rel, value in bind_writes(addr, "nvidia"):  # the crash came after the first device
        rig.fs.write(rel, value)
    assert rig.driver(addr) == "vfio-pci"
    assert await Operations(rig.fs, rig.inv, rig.state).recover() == ["1"]
    assert rig.driver(addr) == "nvidia" and rig.override(addr) == ""


def blocking(path: Path) -> Path:
    """Make a sysfs file a FIFO with no reader: opening it for writing blocks, as a driver's
    unbind can in the kernel. ``read_text`` of it (in a thread) lets the write go through."""
    path.unlink()
    os.mkfifo(path)
    return path


def write_thread_in(rel: str) -> bool:
    return any(t.name == f"sysfs write {rel}" for t in threading.enumerate())


async def test_a_write_the_driver_blocks_fails_the_bind_within_the_deadline(
        tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.fs.write_timeout_s = 0.5
    fifo = blocking(rig.root / "bus/pci/drivers/nvidia/unbind")
    started = time.monotonic()
    with pytest.raises(BackendError) as err:
        await rig.bind("0000:01:00.0")
    assert 0.5 <= time.monotonic() - started < 30
    msg = err.value.message
    assert "failed at 'unbind 0000:01:00.0 from nvidia'" in msg
    assert f"writing '0000:01:00.0' to {fifo} did not return within 0.5 s" in msg
    assert "dmesg" in msg and "sysfs_write_timeout_s" in msg
    assert f"could NOT undo: 0000:01:00.0: writing '0000:01:00.0' to {fifo} has been stuck" in msg
    assert list(rig.fs.stuck) == ["0000:01:00.0"]
    assert (rig.state / "vfio.json").read_text() == "{}"
    with pytest.raises(Conflict, match=r"stuck in the kernel .* nothing more is written to "
                                       r"0000:01:00.0 until it returns"):
        rig.ops.plan_bind(BindRequest(address="0000:01:00.1"))
    assert await asyncio.to_thread(fifo.read_text) == "0000:01:00.0"  # the driver lets go
    await until("the stuck write to return", lambda: not rig.fs.stuck, timeout=30)
    assert rig.driver("0000:01:00.0") == ""  # the late unbind took effect
    fifo.unlink()
    fifo.touch()
    await rig.bind("0000:01:00.0")  # writes to the device are allowed again
    assert {a: rig.driver(a) for a in GPU} == dict.fromkeys(GPU, "vfio-pci")


async def test_a_cancelled_bind_waits_for_its_write_before_the_rollback(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rel = "bus/pci/drivers/nvidia/unbind"
    fifo = blocking(rig.root / rel)
    task = asyncio.create_task(rig.bind("0000:01:00.0"))
    await until("the unbind to be in the kernel", lambda: write_thread_in(rel), timeout=30)
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=1.0)
    assert not done, "the rollback ran while the unbind it undoes was still in the kernel"
    assert await asyncio.to_thread(fifo.read_text) == "0000:01:00.0"
    with pytest.raises(asyncio.CancelledError):
        await task
    assert {a: rig.driver(a) for a in GPU} == ORIG and not rig.fs.stuck


async def test_a_blocked_mdev_create_times_out_and_holds_the_parent(tmp_path: Path) -> None:
    rig = Rig(tmp_path, "intel-gvtg")
    rig.fs.write_timeout_s = 0.5
    types = rig.root / "bus/pci/devices/0000:00:02.0/mdev_supported_types"
    fifo = blocking(types / "i915-GVTg_V5_8/create")
    with pytest.raises(Timeout, match=f"to {fifo} did not return within 0.5 s"):
        await rig.ops.mdev_create(MdevCreate(address="00:02.0", mdev_type="i915-GVTg_V5_8",
                                             uuid=UUID))
    with pytest.raises(Conflict, match="stuck in the kernel"):
        await rig.ops.mdev_create(MdevCreate(address="00:02.0", mdev_type="i915-GVTg_V5_4"))
    assert await asyncio.to_thread(fifo.read_text) == UUID
    await until("the stuck write to return", lambda: not rig.fs.stuck, timeout=30)
    info = await rig.ops.mdev_create(MdevCreate(address="00:02.0", mdev_type="i915-GVTg_V5_4"))
    assert info.parent == "0000:00:02.0"


async def test_single_gpu_hands_over_consoles_and_gives_them_back(tmp_path: Path) -> None:
    rig = Rig(tmp_path, "single-gpu")
    with pytest.raises(Forbidden, match="boot GPU.*--single-gpu"):
        rig.ops.plan_bind(BindRequest(address="0000:0a:00.0"))
    await rig.bind("0000:0a:00.0", single_gpu=True)
    assert rig.kernel.writes[:2] == [
        ("class/vtconsole/vtcon1/bind", "0"),
        ("bus/platform/drivers/efi-framebuffer/unbind", "efi-framebuffer.0")]
    assert rig.driver("0000:0a:00.0") == rig.driver("0000:0a:00.1") == "vfio-pci"
    fb = rig.root / "bus/platform/drivers/efi-framebuffer/efi-framebuffer.0"
    assert not fb.exists()
    await rig.release("0000:0a:00.1")
    assert rig.driver("0000:0a:00.0") == "nvidia"
    assert (rig.root / "class/vtconsole/vtcon1/bind").read_text().strip() == "1"
    assert fb.is_symlink()


async def test_shared_group_needs_force_and_then_goes_whole(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    with pytest.raises(Forbidden, match=r"shares IOMMU group 3 .*0000:00:14.2.*--force"):
        rig.ops.plan_bind(BindRequest(address="0000:00:14.0"))
    await rig.bind("0000:00:14.0", force=True)
    assert rig.driver("0000:00:14.0") == rig.driver("0000:00:14.2") == "vfio-pci"
    # 00:14.2 had no driver: override and probe, no unbind
    assert ("bus/pci/devices/0000:00:14.2/driver_override", "vfio-pci") in rig.kernel.writes
    assert not any(v == "0000:00:14.2" and "unbind" in p for p, v in rig.kernel.writes)
    await rig.release("0000:00:14.2")
    assert (rig.driver("0000:00:14.0"), rig.driver("0000:00:14.2")) == ("xhci_hcd", "")


@pytest.mark.parametrize(("fixture", "address", "kw", "error", "match"), [
    ("intel-desktop", "0000:00:17.0", {"force": True}, Forbidden, "root filesystem"),
    ("intel-desktop", "0000:00:02.0", {}, Forbidden, "boot GPU"),
    ("intel-desktop", "0000:00:01.0", {}, BadRequest, "PCI bridge"),
    ("intel-desktop", "0000:09:00.0", {}, NotFound, "no PCI device 0000:09:00.0"),
    ("intel-desktop", "01:00", {}, InvalidName, "not a PCI address"),
    ("intel-desktop", "../../../etc", {}, InvalidName, "not a PCI address"),
    ("iommu-off", "0000:01:00.0", {}, Conflict, "no IOMMU group.*intel_iommu=on"),
])
def test_bind_refusals(tmp_path: Path, fixture: str, address: str, kw: dict[str, bool],
                       error: type[Exception], match: str) -> None:
    rig = Rig(tmp_path, fixture)
    with pytest.raises(error, match=match):
        rig.ops.plan_bind(BindRequest(address=address, **kw))
    assert rig.kernel.writes == []


def test_forced_bind_takes_the_whole_group(tmp_path: Path) -> None:
    """Forcing takes the whole group; only the root disk and boot GPU stop a forced bind."""
    rig = Rig(tmp_path)
    devices = rig.ops.plan_bind(BindRequest(address="0000:00:1f.3", force=True))
    assert [d.address for d in devices] == ["0000:00:1f.0", "0000:00:1f.3", "0000:00:1f.4",
                                            "0000:00:1f.5", "0000:00:1f.6"]


def test_a_device_that_vanished_since_the_scan(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.builder.remove("0000:01:00.3")
    with pytest.raises(NotFound, match="gone since the last scan"):
        rig.ops.plan_bind(BindRequest(address="0000:01:00.3"))


def test_vfio_pci_not_loaded(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    for f in (rig.root / "bus/pci/drivers/vfio-pci").iterdir():
        f.unlink()
    (rig.root / "bus/pci/drivers/vfio-pci").rmdir()
    with pytest.raises(Unavailable, match="modprobe vfio-pci"):
        rig.ops.plan_bind(BindRequest(address="0000:01:00.0"))


async def test_no_bind_or_release_while_a_vm_uses_the_group(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    await rig.bind("0000:01:00.0")
    rig.vm_holds(1)
    with pytest.raises(Conflict, match=r"in use by pid 4242 \(VM win10\)"):
        rig.ops.plan_release("0000:01:00.1")
    with pytest.raises(Conflict, match="VM win10"):
        rig.ops.plan_bind(BindRequest(address="0000:01:00.0"))


def test_release_of_a_device_not_bound(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    with pytest.raises(Conflict, match="not bound to vfio-pci"):
        rig.ops.plan_release("0000:01:00.0")


def test_a_group_has_one_operation_at_a_time(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.ops.claim("IOMMU group 1", "bind of 0000:01:00.0")
    with pytest.raises(Conflict, match=r"IOMMU group 1 is busy \(bind of 0000:01:00.0\)"):
        rig.ops.claim("IOMMU group 1", "bind of 0000:01:00.1")
    rig.ops.claim("IOMMU group 2", "bind of 0000:00:02.0")
    rig.ops.unclaim("IOMMU group 1")
    rig.ops.claim("IOMMU group 1", "again")


# -- mdev -------------------------------------------------------------------------------------

UUID = "5b1a54f4-9f0e-4c7e-bb0e-2a3c1d6e7f80"


async def test_mdev_create_and_remove(tmp_path: Path) -> None:
    rig = Rig(tmp_path, "intel-gvtg")
    info = await rig.ops.mdev_create(MdevCreate(address="00:02.0", mdev_type="i915-GVTg_V5_8",
                                          uuid=UUID.upper()))
    assert (info.uuid, info.parent, info.mdev_type) == (UUID, "0000:00:02.0", "i915-GVTg_V5_8")
    assert rig.kernel.writes == [
        ("bus/pci/devices/0000:00:02.0/mdev_supported_types/i915-GVTg_V5_8/create", UUID)]
    types = {t.id: t for t in rig.inv.device("0000:00:02.0").mdev_types}
    assert types["i915-GVTg_V5_8"].instances == [UUID]
    assert types["i915-GVTg_V5_8"].available_instances == 1
    with pytest.raises(Conflict, match="exists already"):
        await rig.ops.mdev_create(MdevCreate(address="00:02.0", mdev_type="i915-GVTg_V5_8",
                                             uuid=UUID))
    removed = await rig.ops.mdev_remove(UUID)
    assert removed.parent == "0000:00:02.0" and removed.mdev_type == "i915-GVTg_V5_8"
    assert rig.kernel.writes[-1] == (f"bus/mdev/devices/{UUID}/remove", "1")
    types = {t.id: t for t in rig.inv.device("0000:00:02.0").mdev_types}
    assert types["i915-GVTg_V5_8"].instances == []


async def test_mdev_fresh_uuid_and_exhausted_type(tmp_path: Path) -> None:
    rig = Rig(tmp_path, "intel-gvtg")
    info = await rig.ops.mdev_create(MdevCreate(address="0000:00:02.0", mdev_type="i915-GVTg_V5_4"))
    assert len(info.uuid) == 36
    with pytest.raises(InsufficientResources, match="no instance left"):
        await rig.ops.mdev_create(MdevCreate(address="0000:00:02.0", mdev_type="i915-GVTg_V5_4"))


@pytest.mark.parametrize(("req", "error", "match"), [
    (MdevCreate(address="0000:00:02.0", mdev_type="nvidia-63"), NotFound,
     "no mdev type 'nvidia-63'; it offers i915-GVTg_V5_4, i915-GVTg_V5_8"),
    (MdevCreate(address="0000:00:17.0", mdev_type="x"), BadRequest, "offers no mediated"),
    (MdevCreate(address="0000:00:02.0", mdev_type="i915-GVTg_V5_8", uuid="not-a-uuid"),
     InvalidName, "is not a UUID"),
])
async def test_mdev_bad_input(tmp_path: Path, req: MdevCreate, error: type[Exception],
                        match: str) -> None:
    rig = Rig(tmp_path, "intel-gvtg")
    with pytest.raises(error, match=match):
        await rig.ops.mdev_create(req)
    with pytest.raises(NotFound, match="no mediated device"):
        await rig.ops.mdev_remove(UUID)


# -- SR-IOV -----------------------------------------------------------------------------------


async def test_sriov_count_changes_through_zero(tmp_path: Path) -> None:
    rig = Rig(tmp_path, "sriov-nic")
    pf = await rig.ops.sriov_set("0000:03:00.0", 4)
    assert rig.kernel.writes == [("bus/pci/devices/0000:03:00.0/sriov_numvfs", "0"),
                                 ("bus/pci/devices/0000:03:00.0/sriov_numvfs", "4")]
    assert pf.sriov_numvfs == 4 and len(pf.virtfns) == 4
    assert [d.physfn for d in rig.inv.devices("net") if d.physfn] == ["0000:03:00.0"] * 4
    pf = await rig.ops.sriov_set("0000:03:00.0", 0)
    assert pf.virtfns == [] and not [d for d in rig.inv.devices() if d.physfn]


@pytest.mark.parametrize(("address", "n", "error", "match"), [
    ("0000:03:00.0", 64, BadRequest, "supports 0 to 63 VFs, not 64"),
    ("0000:03:00.0", -1, BadRequest, "not -1"),
    ("0000:05:00.0", 2, BadRequest, "does not support SR-IOV"),
])
async def test_sriov_bad_input(tmp_path: Path, address: str, n: int, error: type[Exception],
                         match: str) -> None:
    rig = Rig(tmp_path, "sriov-nic")
    with pytest.raises(error, match=match):
        await rig.ops.sriov_set(address, n)
    assert rig.kernel.writes == []


async def test_sriov_refused_while_a_vm_uses_a_vf(tmp_path: Path) -> None:
    rig = Rig(tmp_path, "sriov-nic")
    group = rig.inv.device("0000:03:10.0").iommu_group
    assert group is not None
    rig.vm_holds(group, name="router")
    with pytest.raises(Conflict, match="VM router"):
        await rig.ops.sriov_set("0000:03:00.0", 0)
