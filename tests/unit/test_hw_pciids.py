"""The pci.ids reader: names looked up lazily, as lspci does; what it does with odd files."""

from __future__ import annotations

import pytest

from services.hardware.pciids import PciIds

pytestmark = pytest.mark.unit

IDS = """\
# comment at the top
#\tcomment that looks like a device line
10de  NVIDIA Corporation
\t1f02  TU106 [GeForce RTX 2070]
# a comment inside a vendor
\t\t10de 12ae  RTX 2070 Founders
\t\t1043 8670  ROG Strix
\t10f9  TU106 High Definition Audio Controller
8086  Intel Corporation
\t1533  I210 Gigabit Network Connection
\tzzzz  malformed device line
\t\t8086 0001  Ethernet Server Adapter I210-T1

1002  Advanced Micro Devices, Inc. [AMD/ATI]
C 02  Network controller
\t00  Ethernet controller
C 03  Display controller
\t00  VGA compatible controller
\t\t00  VGA controller (a programming interface)
\t02  3D controller
C ff  Unassigned class
"""


def test_vendors_devices_subsystems_and_classes() -> None:
    ids = PciIds.parse(IDS)
    assert ids.vendor(0x10DE) == "NVIDIA Corporation"
    assert ids.vendor(0x1002) == "Advanced Micro Devices, Inc. [AMD/ATI]"
    assert ids.device(0x10DE, 0x1F02) == "TU106 [GeForce RTX 2070]"
    assert ids.device(0x10DE, 0x10F9) == "TU106 High Definition Audio Controller"
    assert ids.subsystem(0x10DE, 0x1F02, 0x1043, 0x8670) == "ROG Strix"
    assert ids.subsystem(0x10DE, 0x10F9, 0x1043, 0x8670) == ""  # under the other device
    assert ids.device(0x8086, 0x1533) == "I210 Gigabit Network Connection"
    # the subsystem under the malformed device line belongs to no device that has a name
    assert ids.subsystem(0x8086, 0x1533, 0x8086, 0x0001) == ""
    assert ids.class_name(0x030000) == "VGA compatible controller"
    assert ids.class_name(0x030200) == "3D controller"
    assert ids.class_name(0x030500) == "Display controller"  # unknown subclass: the class
    assert ids.class_name(0x020000) == "Ethernet controller"
    assert ids.class_name(0xFF0000) == "Unassigned class"


def test_unknown_ids_give_no_name() -> None:
    ids = PciIds.parse(IDS)
    assert ids.vendor(0x1234) == "" and ids.device(0x1234, 0x1111) == ""
    assert ids.device(0x1002, 0x73BF) == ""  # a vendor without devices
    assert ids.subsystem(0x1234, 1, 2, 3) == "" and ids.class_name(0x120000) == ""
    assert ids.vendor(-1) == "" and ids.vendor(0x10000) == ""


def test_a_class_code_is_not_a_vendor() -> None:
    """Vendors are looked up before the class section only, devices within their vendor."""
    ids = PciIds.parse(IDS)
    assert ids.vendor(0x0200) == ""  # "\t00  Ethernet controller" is not vendor 0x0200
    assert ids.device(0x10DE, 0x8086) == ""  # a subsystem line is not a device line


def test_a_truncated_file_names_what_it_holds() -> None:
    cut = IDS[:IDS.index("\t10f9")] + "\t10f9  TU106 High Def"  # cut mid-line, no newline
    ids = PciIds.parse(cut)
    assert ids.device(0x10DE, 0x1F02) == "TU106 [GeForce RTX 2070]"
    assert ids.device(0x10DE, 0x10F9) == "TU106 High Def"
    assert ids.vendor(0x8086) == "" and ids.class_name(0x030000) == ""  # numbers, as lspci
    ids = PciIds.parse("10de  NVID")
    assert ids.vendor(0x10DE) == "NVID" and ids.device(0x10DE, 0x1F02) == ""


def test_malformed_lines_and_crlf_are_skipped_or_read() -> None:
    ids = PciIds.parse(IDS.replace("\n", "\r\n"))
    assert ids.vendor(0x10DE) == "NVIDIA Corporation"
    assert ids.device(0x10DE, 0x1F02) == "TU106 [GeForce RTX 2070]"
    assert ids.class_name(0x030000) == "VGA compatible controller"
    ids = PciIds.parse("8086  Intel\n\t\n\tx\n\t1533  I210\nC zz  bad\n\tzz  bad\n")
    assert ids.device(0x8086, 0x1533) == "I210" and ids.class_name(0) == ""


def test_an_empty_or_binary_file_names_nothing() -> None:
    for text in ("", "\x00\x01\xff garbage\n", "\n\n\n"):
        ids = PciIds.parse(text)
        assert (ids.vendor(0x10DE), ids.device(0x10DE, 1), ids.class_name(0x030000)) == (
            "", "", "")


def test_the_systems_database_names_common_devices() -> None:
    import os

    from services.hardware.pciids import PATHS, load

    if not any(os.path.exists(p) for p in PATHS):
        pytest.skip("no pci.ids on this machine")
    ids = load()
    assert "Intel" in ids.vendor(0x8086) and ids.class_name(0x030000)
