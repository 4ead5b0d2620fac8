"""Names from the PCI ID database (Debian ``hwdata``), read once per process.

    >>> ids = PciIds.parse("10de  NVIDIA Corporation\\n\\t1f02  TU106 [GeForce RTX 2070]\\n"
    ...                    "C 03  Display controller\\n\\t00  VGA compatible controller\\n")
    >>> ids.vendor(0x10DE), ids.device(0x10DE, 0x1F02), ids.class_name(0x030000)
    ('NVIDIA Corporation', 'TU106 [GeForce RTX 2070]', 'VGA compatible controller')
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

PATHS = ("/usr/share/hwdata/pci.ids", "/usr/share/misc/pci.ids")


class PciIds:
    """Vendor, device, subsystem and class names; unknown ids give ``""``.

    Nothing is parsed up front (as lspci, which also looks names up when asked): a vendor's
    line is found with one ``str.find`` of ``"\\n<id>  "`` before the class section, its
    devices are parsed when that vendor is first asked for, and the classes (a few hundred
    lines at the end) when a class is. A report names a few dozen vendors out of thousands.
    A malformed line is skipped and a truncated file names what it still holds: ids it
    does not name get ``""`` (shown as numbers), as lspci shows them.
    """

    def __init__(self, text: str) -> None:
        self._text = "\n" + text if not text.startswith("\n") else text
        c = self._text.find("\nC ")
        self._vendor_end = c if c >= 0 else len(self._text)
        self._vendors: dict[int, tuple[str, int] | None] = {}
        self._devices: dict[int, dict[int, tuple[str, dict[tuple[int, int], str]]]] = {}
        self._classes: dict[tuple[int, ...], str] | None = None

    @classmethod
    def parse(cls, text: str) -> PciIds:
        return cls(text)

    def _lines(self, pos: int, stop: int) -> Iterator[str]:
        """The lines of the text from ``pos`` (a line's start) to ``stop``."""
        text = self._text
        while pos < stop:
            nl = text.find("\n", pos, stop)
            if nl < 0:
                nl = stop
            yield text[pos:nl].rstrip("\r")
            pos = nl + 1

    def _vendor(self, vendor: int) -> tuple[str, int] | None:
        """The vendor's name and where its device lines start."""
        if vendor in self._vendors:
            return self._vendors[vendor]
        found = None
        if 0 <= vendor <= 0xFFFF:
            at = self._text.find(f"\n{vendor:04x}  ", 0, self._vendor_end)
            if at >= 0:
                nl = self._text.find("\n", at + 1)
                nl = len(self._text) if nl < 0 else nl
                found = (self._text[at + 7:nl].rstrip("\r"), nl + 1)
        self._vendors[vendor] = found
        return found

    def vendor(self, vendor: int) -> str:
        entry = self._vendor(vendor)
        return entry[0] if entry else ""

    def _vendor_devices(self, vendor: int) -> dict[int, tuple[str, dict[tuple[int, int], str]]]:
        devices = self._devices.get(vendor)
        if devices is not None:
            return devices
        devices = {}
        entry = self._vendor(vendor)
        if entry:
            subs: dict[tuple[int, int], str] = {}
            for line in self._lines(entry[1], len(self._text)):
                if not line or line[0] == "#":
                    continue
                if line[0] != "\t":
                    break
                try:
                    if line[1] != "\t":
                        subs = {}
                        devices[int(line[1:5], 16)] = (line[7:], subs)
                    else:
                        subs[(int(line[2:6], 16), int(line[7:11], 16))] = line[13:]
                except (ValueError, IndexError):  # a malformed line names nothing
                    continue
        self._devices[vendor] = devices
        return devices

    def device(self, vendor: int, device: int) -> str:
        entry = self._vendor_devices(vendor).get(device)
        return entry[0] if entry else ""

    def subsystem(self, vendor: int, device: int, sub_vendor: int, sub_device: int) -> str:
        entry = self._vendor_devices(vendor).get(device)
        return entry[1].get((sub_vendor, sub_device), "") if entry else ""

    def _class_names(self) -> dict[tuple[int, ...], str]:
        if self._classes is not None:
            return self._classes
        classes: dict[tuple[int, ...], str] = {}
        cls = -1
        for line in self._lines(self._vendor_end + 1, len(self._text)):
            if not line or line[0] == "#":
                continue
            try:
                if line.startswith("C "):
                    cls = int(line[2:4], 16)
                    classes[(cls,)] = line[6:]
                elif line[0] != "\t":
                    cls = -1  # a section after the classes
                elif cls >= 0 and line[1] != "\t":
                    classes[(cls, int(line[1:3], 16))] = line[5:]
            except (ValueError, IndexError):
                continue
        self._classes = classes
        return classes

    def class_name(self, code: int) -> str:
        """The name of a 24-bit class code's subclass ("USB controller"), else its class."""
        c = self._class_names()
        return c.get((code >> 16, (code >> 8) & 0xFF)) or c.get((code >> 16,)) or ""


@lru_cache(maxsize=1)
def load() -> PciIds:
    """The system's database (empty when hwdata is not installed: ids without names)."""
    for path in PATHS:
        try:
            return PciIds(Path(path).read_text(encoding="utf-8", errors="replace"))
        except OSError:
            continue
    return PciIds("")
