"""Validators every agent uses at its edge, one per kind of input.

Subject tokens are in ``shared.subjects.token``; names of volumes, VMs and images have
rules of their own in their agents. Here: PCI addresses and disk image formats.

    >>> pci_address("01:00.0")
    '0000:01:00.0'
    >>> disk_format(b"QFI\\xfb\\x00\\x00\\x00\\x03")
    'qcow2'
"""

from __future__ import annotations

import re
from pathlib import Path

from shared.errors import InvalidName

PCI_ADDRESS = re.compile(r"^([0-9a-fA-F]{4}):([0-9a-fA-F]{2}):([0-1][0-9a-fA-F])\.([0-7])$")
_PCI_LOOSE = re.compile(r"^(?:([0-9a-fA-F]{4}):)?([0-9a-fA-F]{2}):([0-9a-fA-F]{2})\.([0-7])$")


def pci_address(text: str) -> str:
    """``0000:01:00.0`` from ``01:00.0`` or ``0000:01:00.0`` (any case); else InvalidName."""
    m = _PCI_LOOSE.match(text.strip()) if isinstance(text, str) else None
    if not m:
        raise InvalidName(f"{text!r} is not a PCI address: use DDDD:BB:SS.F or BB:SS.F, "
                          "e.g. 0000:01:00.0 (see `phyllome hw list`)")
    dom, bus, slot, fn = m.groups()
    if int(slot, 16) > 0x1F:
        raise InvalidName(f"{text!r} is not a PCI address: the slot is 00-1f")
    return f"{(dom or '0000').lower()}:{bus.lower()}:{slot.lower()}.{fn}"


# -- disk image formats (RAW-only policy) -----------------------------------------------------

HEAD_BYTES = 4096  # enough for every header below
TAIL_BYTES = 512  # a fixed VHD has its footer at the end
FORMAT_NAMES = {"qcow2": "qcow2", "qed": "QED", "vmdk": "VMDK", "vhdx": "VHDX", "vpc": "VHD",
                "vdi": "VDI"}


ISO_DESCRIPTORS = 0x8000  # sector 16: where ISO9660 and UDF volume descriptors start
ISO_MAGICS = (b"CD001", b"BEA01", b"NSR02", b"NSR03", b"TEA01")


def is_iso(path: str | Path) -> bool:
    """Whether a file is an ISO9660 or UDF image (a volume descriptor in the first four
    sectors from 32 KiB on); OSError passes through for the caller's words."""
    with open(path, "rb") as f:
        f.seek(ISO_DESCRIPTORS)
        head = f.read(2048 * 4)
    return any(head[i + 1:i + 6] in ISO_MAGICS for i in range(0, len(head), 2048))


def disk_format(head: bytes, tail: bytes = b"") -> str | None:
    """The image format a file's first 4 KiB (and last 512 bytes) show, or None for RAW.
    Names are qemu-img's (``vpc`` is VHD)."""
    if head.startswith(b"QFI\xfb"):
        return "qcow2"
    if head.startswith(b"QED\x00"):
        return "qed"
    if head.startswith(b"KDMV") or head.startswith(b"# Disk DescriptorFile"):
        return "vmdk"
    if head.startswith(b"vhdxfile"):
        return "vhdx"
    if head.startswith(b"conectix") or tail.startswith(b"conectix"):
        return "vpc"
    if head[0x40:0x44] == b"\x7f\x10\xda\xbe" or b"VirtualBox Disk Image" in head[:64]:
        return "vdi"
    return None


def read_format(path: str | Path) -> str | None:
    """``disk_format`` of a file (OSError passes through for the caller's words)."""
    with open(path, "rb") as f:
        head = f.read(HEAD_BYTES)
        size = f.seek(0, 2)
        f.seek(max(0, size - TAIL_BYTES))
        tail = f.read(TAIL_BYTES)
    return disk_format(head, tail)


def conversion_hint(fmt: str, source: str) -> str:
    """What to tell someone who offered a non-RAW image."""
    stem = Path(source).stem or "disk"
    return (f"{source} is a {FORMAT_NAMES.get(fmt, fmt)} image, not RAW; convert it first: "
            f"`qemu-img convert -f {fmt} -O raw {source} {Path(source).parent / stem}.raw`")
