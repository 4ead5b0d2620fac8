"""Guest architectures: the machine, emulator and firmware each one needs, and which of them
this host can run.

A guest of the host's own architecture may run under KVM; any other one is emulated by QEMU
(TCG). The firmware is what libvirt would pick for a ``<os firmware='efi'>`` domain: a QEMU
firmware descriptor (``/usr/share/qemu/firmware/*.json``, shipped by Debian's ``ovmf`` and
``qemu-efi-aarch64``) naming the arch and a ``virt-*``/``pc-q35-*`` machine, whose code file
exists; Secure Boot when it has the ``secure-boot`` and ``enrolled-keys`` features::

    >>> MACHINE["aarch64"], EMULATOR["aarch64"]
    ('virt', 'qemu-system-aarch64')
    >>> normalize("arm64")
    'aarch64'
"""

from __future__ import annotations

import fnmatch
import json
import platform
import shutil
from collections.abc import Callable
from pathlib import Path

from shared.messages.hardware import GuestArch
from shared.messages.vm import Arch, Machine

ARCHS: tuple[Arch, ...] = ("x86_64", "aarch64")
MACHINE: dict[str, Machine] = {"x86_64": "q35", "aarch64": "virt"}
# The machines as QEMU 7.2 versions them (firmware descriptors match "pc-q35-*", "virt-*").
VERSIONED_MACHINE = {"x86_64": "pc-q35-7.2", "aarch64": "virt-7.2"}
EMULATOR = {arch: f"qemu-system-{arch}" for arch in ARCHS}
# The Debian packages that bring an arch's emulator and its UEFI firmware.
PACKAGES = {"x86_64": ("qemu-system-x86", "ovmf"),
            "aarch64": ("qemu-system-arm", "qemu-efi-aarch64")}
FIRMWARE_NAME = {"x86_64": "OVMF", "aarch64": "AAVMF"}
FIRMWARE_DIRS = ("/etc/qemu/firmware", "/usr/share/qemu/firmware")
_SPELLINGS = {"amd64": "x86_64", "x86-64": "x86_64", "arm64": "aarch64"}


def normalize(arch: str) -> str:
    """The kernel's name of ``arch`` (Debian's ``arm64`` is ``aarch64``)."""
    return _SPELLINGS.get(arch.lower(), arch.lower())


def host_arch() -> str:
    """This host's architecture, as guests name theirs."""
    return normalize(platform.machine())


def _descriptors(dirs: tuple[str, ...]) -> list[dict[str, object]]:
    out = []
    for directory in dirs:
        for desc in sorted(Path(directory).glob("*.json")):
            try:
                data = json.loads(desc.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(data, dict):
                out.append(data)
    return out


def _list(value: object) -> list[object]:
    return value if isinstance(value, list) else []


def _targets(desc: dict[str, object], arch: str) -> bool:
    """Whether the descriptor's firmware runs ``arch`` guests on the arch's machine."""
    machine = VERSIONED_MACHINE.get(arch, "")
    for target in _list(desc.get("targets")):
        if not isinstance(target, dict) or target.get("architecture") != arch:
            continue
        if any(isinstance(p, str) and fnmatch.fnmatch(machine, p)
               for p in _list(target.get("machines"))):
            return True
    return False


def _code_exists(desc: dict[str, object]) -> bool:
    mapping = desc.get("mapping")
    if not isinstance(mapping, dict):
        return False
    executable = mapping.get("executable")
    name = executable.get("filename", "") if isinstance(executable, dict) else ""
    return bool(name) and Path(name).is_file()


def guest_arch(arch: str, *, dirs: tuple[str, ...] = FIRMWARE_DIRS,
               which: Callable[[str], str | None] = shutil.which) -> GuestArch:
    """What this host has for guests of ``arch``: its QEMU, UEFI and Secure Boot firmware."""
    uefi = secure = False
    for desc in _descriptors(dirs):
        if "uefi" not in _list(desc.get("interface-types")) or not _targets(desc, arch) \
                or not _code_exists(desc):
            continue
        uefi = True
        features = _list(desc.get("features"))
        secure = secure or ("secure-boot" in features and "enrolled-keys" in features)
    emulator = which(EMULATOR[arch]) if arch in EMULATOR else None
    return GuestArch(arch=arch, emulator=emulator or "", uefi=uefi, secure_boot=secure)


def guest_archs(*, dirs: tuple[str, ...] = FIRMWARE_DIRS,
                which: Callable[[str], str | None] = shutil.which) -> list[GuestArch]:
    """Every arch Phyllome knows, as this host has it (placement reads it from KV)."""
    return [guest_arch(arch, dirs=dirs, which=which) for arch in ARCHS]


def missing(arch: str, have: GuestArch | None, *, uefi: bool, secure_boot: bool) -> str | None:
    """What a host lacks to run a guest of ``arch`` (None: nothing), with what to install."""
    if arch not in EMULATOR:
        return f"no support for {arch} guests (Phyllome runs {', '.join(ARCHS)})"
    emulator, firmware = PACKAGES[arch]
    if have is None or not have.emulator:
        return f"no {EMULATOR[arch]} for {arch} guests (apt-get install {emulator})"
    if uefi and not have.uefi:
        return (f"no UEFI firmware for {arch} guests ({FIRMWARE_NAME[arch]}: apt-get "
                f"install {firmware})")
    if secure_boot and not have.secure_boot:
        return (f"no Secure Boot firmware for {arch} guests ({FIRMWARE_NAME[arch]} with "
                f"Microsoft's keys: apt-get install {firmware})")
    return None
