"""Readiness rules on small hand-made device lists (no sysfs)."""

from __future__ import annotations

import pytest

from services.hardware import readiness
from services.hardware.pciids import PciIds
from shared.errors import InvalidName
from shared.messages.hardware import Passthrough, PciDevice
from shared.validate import pci_address


def dev(addr: str, cls: str, vendor: str = "10de", group: int | None = 1, **kw: object
        ) -> PciDevice:
    return PciDevice(address=addr, vendor_id=vendor, device_id="0001", class_code=cls,
                     iommu_group=group, **kw)  # type: ignore[arg-type]


def assess(devices: list[PciDevice], *, iommu: bool = True, iommu_hint: str = "",
           root_disk: str | None = None) -> dict[str, Passthrough]:
    ctx = readiness.context(devices, iommu=iommu, iommu_hint=iommu_hint, root_disk=root_disk)
    return readiness.assess(devices, ctx)


def test_alone_in_group_with_a_root_port_is_isolated() -> None:
    v = assess([dev("0000:00:01.0", "060400", "8086"), dev("0000:01:00.0", "030000")],
                         iommu=True, iommu_hint="", root_disk=None)
    assert v["0000:01:00.0"].verdict == "isolated"
    assert "0000:00:01.0" not in v  # bridges have no verdict


def test_gpu_functions_are_companions() -> None:
    v = assess([dev("0000:01:00.0", "030000"), dev("0000:01:00.1", "040300"),
                          dev("0000:01:00.2", "0c0330"), dev("0000:01:00.3", "0c8000")],
                         iommu=True, iommu_hint="", root_disk=None)
    gpu = v["0000:01:00.0"]
    assert gpu.verdict == "with-companions"
    assert gpu.companions == ["0000:01:00.1", "0000:01:00.2", "0000:01:00.3"]
    assert gpu.shares_with == []
    assert v["0000:01:00.1"].companions == ["0000:01:00.0", "0000:01:00.2", "0000:01:00.3"]


def test_chipset_functions_in_one_slot_are_never_companions() -> None:
    pch = [dev("0000:00:1f.0", "060100", "8086"), dev("0000:00:1f.3", "040300", "8086"),
           dev("0000:00:1f.4", "0c0500", "8086")]
    v = assess(pch, iommu=True, iommu_hint="", root_disk=None)
    assert v["0000:00:1f.3"].verdict == "shared-group"
    assert v["0000:00:1f.3"].companions == []
    assert v["0000:00:1f.3"].shares_with == ["0000:00:1f.0", "0000:00:1f.4"]


def test_other_vendor_in_the_slot_is_not_a_companion() -> None:
    v = assess([dev("0000:01:00.0", "030000"), dev("0000:01:00.1", "040300", "1102")],
                         iommu=True, iommu_hint="", root_disk=None)
    assert v["0000:01:00.0"].verdict == "shared-group"


def test_shared_group_says_what_the_host_loses() -> None:
    devices = [dev("0000:02:00.0", "0c0330", "1022", 4), dev("0000:02:00.1", "010601", "1022", 4),
               dev("0000:05:00.0", "020000", "10ec", 4),
               dev("0000:08:00.0", "030000", "1002", 6, boot_vga=True)]
    v = assess(devices, iommu=True, iommu_hint="", root_disk="0000:02:00.1")
    usb = v["0000:02:00.0"]
    assert usb.verdict == "shared-group"
    assert usb.shares_with == ["0000:02:00.1", "0000:05:00.0"]
    assert any("root filesystem" in x and "0000:02:00.1" in x for x in usb.host_loses)
    assert any("only network controller" in x for x in usb.host_loses)
    assert any("boot GPU" in x for x in v["0000:08:00.0"].host_loses)


def test_vfs_do_not_count_as_the_hosts_network_controllers() -> None:
    devices = [dev("0000:03:00.0", "020000", "8086", 2),
               dev("0000:03:10.0", "020000", "8086", 3, physfn="0000:03:00.0")]
    v = assess(devices, iommu=True, iommu_hint="", root_disk=None)
    assert v["0000:03:00.0"].host_loses == ["0000:03:00.0 is the host's only network controller"]


def test_iommu_off_gives_the_hint_to_every_device() -> None:
    v = assess([dev("0000:01:00.0", "030000", group=None)], iommu=False,
                         iommu_hint="IOMMU is off: x", root_disk=None)
    assert v["0000:01:00.0"].verdict == "no-iommu"
    assert v["0000:01:00.0"].reasons == ["IOMMU is off: x"]


@pytest.mark.parametrize(("vendor", "guest", "cmdline", "expected", "absent"), [
    ("intel", False, "", "intel_iommu=on", "amd"),
    ("amd", False, "", "AMD-Vi", "intel_iommu=on"),
    ("amd", False, "quiet amd_iommu=off", "remove amd_iommu=off", "intel_iommu"),
    ("amd", True, "", "virtual IOMMU", "intel_iommu=on iommu"),
])
def test_iommu_hint_is_for_the_cpu_vendor(vendor: str, guest: bool, cmdline: str,
                                          expected: str, absent: str) -> None:
    hint = readiness.iommu_hint(vendor, hypervisor_guest=guest, cmdline=cmdline)
    assert expected in hint
    assert absent not in hint


def test_gpu_view_single_gpu_handoff() -> None:
    gpus = readiness.gpu_view([dev("0000:0a:00.0", "030000", boot_vga=True, name="GA104"),
                               dev("0000:0a:00.1", "040300")])
    assert [(g.vendor, g.only_gpu, g.boot_vga) for g in gpus] == [("nvidia", True, True)]
    assert any("--single-gpu" in s and "consoles" in s for s in gpus[0].handoff)
    two = readiness.gpu_view([dev("0000:00:02.0", "030000", "8086", boot_vga=True),
                              dev("0000:01:00.0", "030200")])
    assert [(g.vendor, g.only_gpu) for g in two] == [("intel", False), ("nvidia", False)]
    assert two[1].handoff == []


@pytest.mark.parametrize(("text", "expected"), [
    ("0000:01:00.0", "0000:01:00.0"), ("01:00.0", "0000:01:00.0"),
    ("0000:0A:1F.7", "0000:0a:1f.7"), (" 0001:00:02.0 ", "0001:00:02.0")])
def test_address_normalized(text: str, expected: str) -> None:
    assert pci_address(text) == expected


@pytest.mark.parametrize("bad", ["", "01:00", "0000:01:00.8", "0000:01:20.0", "zz:00.0",
                                 "0000:01:00.0/../../x", "../0000:01:00.0"])
def test_malformed_address_is_refused(bad: str) -> None:
    with pytest.raises(InvalidName, match="not a PCI address"):
        pci_address(bad)


def test_pci_ids_names_and_unknowns() -> None:
    ids = PciIds.parse("# c\n10de  NVIDIA Corporation\n\t1f02  TU106 [GeForce RTX 2070]\n"
                       "\t\t1043 8670  ROG STRIX\n8086  Intel Corporation\n"
                       "C 03  Display controller\n\t00  VGA compatible controller\n"
                       "\t\t00  VGA controller\n\t02  3D controller\n")
    assert ids.vendor(0x10DE) == "NVIDIA Corporation"
    assert ids.device(0x10DE, 0x1F02) == "TU106 [GeForce RTX 2070]"
    assert ids.subsystem(0x10DE, 0x1F02, 0x1043, 0x8670) == "ROG STRIX"
    assert ids.class_name(0x030000) == "VGA compatible controller"
    assert ids.class_name(0x030200) == "3D controller"
    assert ids.class_name(0x038000) == "Display controller"
    assert (ids.vendor(0xFFFF), ids.device(0x8086, 0x1), ids.class_name(0x120000)) == ("", "", "")
