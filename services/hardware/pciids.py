"""Names from the PCI ID database (Debian ``hwdata``), read once per process.

    >>> ids = PciIds.parse("10de  NVIDIA Corporation\\n\\t1f02  TU106 [GeForce RTX 2070]\\n"
    ...                    "C 03  Display controller\\n\\t00  VGA compatible controller\\n")
    >>> ids.vendor(0x10DE), ids.device(0x10DE, 0x1F02), ids.class_name(0x030000)
    ('NVIDIA Corporation', 'TU106 [GeForce RTX 2070]', 'VGA compatible controller')
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

PATHS = ("/usr/share/hwdata/pci.ids", "/usr/share/misc/pci.ids")


class PciIds:
    """Vendor, device, subsystem and class names; unknown ids give ``""``.

    Devices of a vendor are parsed when that vendor is first asked for: a report names a
    few dozen vendors out of thousands, and this keeps the one read of the file cheap.
    """

    def __init__(self, lines: list[str]) -> None:
        self._lines = lines
        self._vendors: dict[int, tuple[str, int]] = {}
        self._devices: dict[int, dict[int, tuple[str, dict[tuple[int, int], str]]]] = {}
        self._classes: dict[tuple[int, ...], str] = {}
        cls = -1
        in_classes = False
        for i, line in enumerate(lines):
            if not line or line[0] == "#":
                continue
            if line[0] != "\t":
                in_classes = line.startswith("C ")
                if in_classes:
                    cls = int(line[2:4], 16)
                    self._classes[(cls,)] = line[6:]
                elif len(line) > 6 and line[4] == " ":
                    try:
                        self._vendors[int(line[:4], 16)] = (line[6:], i)
                    except ValueError:
                        continue
            elif in_classes and line[1] != "\t":
                self._classes[(cls, int(line[1:3], 16))] = line[5:]

    @classmethod
    def parse(cls, text: str) -> PciIds:
        return cls(text.splitlines())

    def vendor(self, vendor: int) -> str:
        entry = self._vendors.get(vendor)
        return entry[0] if entry else ""

    def _vendor_devices(self, vendor: int) -> dict[int, tuple[str, dict[tuple[int, int], str]]]:
        devices = self._devices.get(vendor)
        if devices is not None:
            return devices
        devices = {}
        entry = self._vendors.get(vendor)
        if entry:
            subs: dict[tuple[int, int], str] = {}
            for line in self._lines[entry[1] + 1:]:
                if not line or line[0] == "#":
                    continue
                if line[0] != "\t":
                    break
                if line[1] != "\t":
                    subs = {}
                    devices[int(line[1:5], 16)] = (line[7:], subs)
                else:
                    subs[(int(line[2:6], 16), int(line[7:11], 16))] = line[13:]
        self._devices[vendor] = devices
        return devices

    def device(self, vendor: int, device: int) -> str:
        entry = self._vendor_devices(vendor).get(device)
        return entry[0] if entry else ""

    def subsystem(self, vendor: int, device: int, sub_vendor: int, sub_device: int) -> str:
        entry = self._vendor_devices(vendor).get(device)
        return entry[1].get((sub_vendor, sub_device), "") if entry else ""

    def class_name(self, code: int) -> str:
        """The name of a 24-bit class code's subclass ("USB controller"), else its class."""
        c = self._classes
        return c.get((code >> 16, (code >> 8) & 0xFF)) or c.get((code >> 16,)) or ""


@lru_cache(maxsize=1)
def load() -> PciIds:
    """The system's database (empty when hwdata is not installed: ids without names)."""
    for path in PATHS:
        try:
            return PciIds(Path(path).read_text(encoding="utf-8", errors="replace").splitlines())
        except OSError:
            continue
    return PciIds([])
