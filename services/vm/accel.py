"""Which accelerator VMs get: the KVM boot probe, once per host boot.

``/dev/kvm`` answering ioctls is not enough: on some hosts (nested clouds, Firecracker) a
Linux guest hangs under KVM. So ``auto`` boots the phyllome-tiny direct-kernel guest under
KVM with QEMU (no libvirt, no disk) and requires its ``PHYLLOME-TINY: ready`` serial marker
within a deadline; without it KVM is marked unusable and VMs run under TCG. The verdict is
cached in the state directory per host boot (``/proc/sys/kernel/random/boot_id``)::

    decision = await decide("auto", tiny_dir, cache_dir, deadline_s=10)
    decision.accelerator            # "tcg" on such a host
    decision.note                   # "KVM unusable: no guest marker within 10 s (...)"
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Literal

import msgspec

from shared.errors import BadRequest
from shared.messages.vm import AcceleratorDecision

log = logging.getLogger("phyllome.vm.accel")

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
READY_MARKER = b"PHYLLOME-TINY: ready"
CACHE_NAME = "accelerator.json"

Accel = Literal["kvm", "tcg"]


async def probe(kernel: Path, initrd: Path, *, deadline_s: float,
                accel: Accel = "kvm") -> tuple[bool, str, float]:
    """Boot the tiny guest under ``accel``; (marker seen, detail, seconds taken)."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        return False, "qemu-system-x86_64 is not installed", 0.0
    if accel == "kvm" and not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is missing or not accessible", 0.0
    for path in (kernel, initrd):
        if not path.is_file():
            return False, f"the probe guest is missing ({path}); build it with " \
                          "deploy/images/build-tiny.sh", 0.0
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        qemu, "-accel", accel, "-machine", "q35", "-m", "128", "-nodefaults",
        "-no-user-config", "-display", "none", "-serial", "stdio", "-no-reboot",
        "-kernel", str(kernel), "-initrd", str(initrd), "-append", "console=ttyS0 panic=-1",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    assert proc.stdout is not None
    seen = b""
    try:
        async with asyncio.timeout(deadline_s):
            while READY_MARKER not in seen:
                chunk = await proc.stdout.read(4096)
                if not chunk:
                    break
                seen = seen[-8192:] + chunk
    except TimeoutError:
        pass
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
    took = time.monotonic() - started
    if READY_MARKER in seen:
        return True, f"guest reached userspace under {accel} in {took:.1f} s", took
    last = seen.decode(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
    if proc.returncode not in (None, -9) and took < deadline_s:
        return False, f"QEMU exited with {proc.returncode}: {last[0][:200]}", took
    return False, f"no guest marker within {deadline_s:g} s (last line: {last[0][:120]!r})", took


def boot_id() -> str:
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return ""


async def decide(policy: str, tiny_dir: Path, cache_dir: Path, *,
                 deadline_s: float) -> AcceleratorDecision:
    """The accelerator for ``auto`` VMs: forced by policy, cached for this boot, or probed."""
    if policy in ("kvm", "tcg"):
        return AcceleratorDecision(policy=policy, accelerator=policy,  # type: ignore[arg-type]
                        note=f"accelerator forced to {policy} by configuration")
    if policy != "auto":
        raise BadRequest(f"accelerator {policy!r} is not one of auto, kvm, tcg")
    current = boot_id()
    cache = cache_dir / CACHE_NAME
    with contextlib.suppress(OSError, msgspec.MsgspecError):
        cached = msgspec.json.decode(cache.read_bytes(), type=AcceleratorDecision)
        if cached.boot_id == current and current:
            return cached
    ok, detail, took = await probe(tiny_dir / "vmlinuz", tiny_dir / "initrd.gz",
                                   deadline_s=deadline_s)
    decision = AcceleratorDecision(
        policy="auto", accelerator="kvm" if ok else "tcg", kvm_usable=ok,
        note=("KVM boot probe passed: " if ok else "KVM unusable, VMs run under TCG (slow): ")
        + detail,
        boot_id=current, probed_at=time.time(), probe_s=round(took, 3))
    (log.info if ok else log.warning)("accelerator: %s", decision.note)
    if not took:  # the probe could not run (no guest image, no /dev/kvm): ask again next start
        return decision
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    tmp.write_bytes(msgspec.json.encode(decision))
    tmp.replace(cache)
    return decision
