"""The ioctl-level KVM check: create a VM, run a few real-mode instructions to an I/O exit
and HLT. It runs in a child process (``python -m services.hardware.kvm``) so that a KVM
that hangs in KVM_RUN cannot hang the agent; the parent gives it a deadline.

Passing it does NOT mean a guest OS boots under KVM (on this kind of machine it passes in
0.3 ms while a Linux guest hangs at boot); only the VM agent's boot probe says that.

    $ python -m services.hardware.kvm
    {"result": "passed", "detail": "guest wrote '4' to port 0x3f8 and halted", "ms": 0.3}
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import mmap
import os
import struct
import subprocess
import sys
import time

import msgspec

from shared.messages.hardware import ProbeResult

# ioctl numbers from <linux/kvm.h> (x86-64)
KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
KVM_GET_VCPU_MMAP_SIZE = 0xAE04
KVM_CREATE_VCPU = 0xAE41
KVM_SET_USER_MEMORY_REGION = 0x4020AE46
KVM_RUN = 0xAE80
KVM_SET_REGS = 0x4090AE82
KVM_GET_SREGS = 0x8138AE83
KVM_SET_SREGS = 0x4138AE84
KVM_EXIT_IO = 2
KVM_EXIT_HLT = 5
GUEST_ADDR = 0x1000
# mov dx, 0x3f8; add al, bl; add al, '0'; out dx, al; hlt   (al = bl = 2: prints '4')
CODE = bytes([0xBA, 0xF8, 0x03, 0x00, 0xD8, 0x04, ord("0"), 0xEE, 0xF4])


class ProbeOutcome(msgspec.Struct, frozen=True):
    result: ProbeResult
    detail: str
    ms: float = 0.0


def _probe(dev: str) -> ProbeOutcome:
    started = time.perf_counter()
    kvm = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
    try:
        version = fcntl.ioctl(kvm, KVM_GET_API_VERSION, 0)
        if version != 12:
            return ProbeOutcome("failed", f"KVM API version {version}, expected 12")
        vm = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)
        mem = mmap.mmap(-1, 0x1000, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        mem.write(CODE)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(mem))
        region = struct.pack("=IIQQQ", 0, 0, GUEST_ADDR, 0x1000, addr)
        fcntl.ioctl(vm, KVM_SET_USER_MEMORY_REGION, region)
        vcpu = fcntl.ioctl(vm, KVM_CREATE_VCPU, 0)
        run_size = fcntl.ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0)
        run = mmap.mmap(vcpu, run_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        sregs = bytearray(fcntl.ioctl(vcpu, KVM_GET_SREGS, bytes(312)))
        struct.pack_into("=Q", sregs, 0, 0)  # cs.base
        struct.pack_into("=H", sregs, 12, 0)  # cs.selector
        fcntl.ioctl(vcpu, KVM_SET_SREGS, bytes(sregs))
        regs = bytearray(144)
        struct.pack_into("=QQ", regs, 0, 2, 2)  # rax, rbx
        struct.pack_into("=QQ", regs, 128, GUEST_ADDR, 0x2)  # rip, rflags
        fcntl.ioctl(vcpu, KVM_SET_REGS, bytes(regs))
        out = b""
        for _ in range(4):
            fcntl.ioctl(vcpu, KVM_RUN, 0)
            reason = struct.unpack_from("=I", run, 8)[0]
            if reason == KVM_EXIT_IO:
                _dir, size, port, count, offset = struct.unpack_from("=BBHIQ", run, 32)
                out += run[offset:offset + size * count]
                if port != 0x3F8:
                    return ProbeOutcome("failed", f"I/O exit on port {port:#x}, expected 0x3f8")
            elif reason == KVM_EXIT_HLT:
                ms = (time.perf_counter() - started) * 1000
                if out != b"4":
                    return ProbeOutcome("failed", f"guest halted after writing {out!r}", ms)
                return ProbeOutcome(
                    "passed", "guest wrote '4' to port 0x3f8 and halted", round(ms, 3))
            else:
                return ProbeOutcome("failed", f"unexpected exit reason {reason}")
        return ProbeOutcome("failed", "guest did not halt")
    finally:
        os.close(kvm)


def probe(dev: str = "/dev/kvm") -> ProbeOutcome:
    """Run the check here, in this process (the child side)."""
    if not os.path.exists(dev):
        return ProbeOutcome("not-run", f"{dev} does not exist (kvm module not loaded?)")
    try:
        return _probe(dev)
    except OSError as e:
        return ProbeOutcome("failed", f"{e.strerror or e} (errno {e.errno})")


def probe_in_child(timeout_s: float = 5.0) -> ProbeOutcome:
    """Run the check in a child process with a deadline (a hung KVM_RUN is a failure)."""
    try:
        done = subprocess.run([sys.executable, "-m", "services.hardware.kvm"],
                              capture_output=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return ProbeOutcome("failed", f"KVM_RUN did not return within {timeout_s:g} s")
    try:
        return msgspec.json.decode(done.stdout, type=ProbeOutcome)
    except msgspec.DecodeError:
        return ProbeOutcome("failed", f"probe exited {done.returncode}: "
                                      f"{done.stderr.decode(errors='replace')[-200:]}")


if __name__ == "__main__":
    print(json.dumps(msgspec.to_builtins(probe())))
