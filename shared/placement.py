"""Where a new VM goes (``phyllome vm create --host auto``): a pure choice over the host views.

A host qualifies when it is up, runs a vm and a storage agent, and has what the spec needs:
memory (free now, and not promised to the VMs already defined there), room in the pool,
QEMU and UEFI / Secure Boot firmware for the guest's arch (``shared.archs``), swtpm for a
TPM, nested virtualization, the memory encryption of a confidential guest (SEV, SEV-ES,
SEV-SNP or TDX under a usable KVM), and every host device the spec names: a GPU with the
other functions of its card, an SR-IOV VF, a mediated device, each one the host's hardware
agent publishes as passable (``HostResources``). Among those, the one with the most memory
left after the VM wins (ties: the name), so VMs spread.
The reply names the host and says why, and why every other host was passed over::

    choice = await choose(bus, spec, disk_bytes=10 << 30)   # or place(needs(...), views, ...)
    choice.host, choice.reason   # "b", "b: up, 5.1 GiB memory left after this VM (most of 2 ..."
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import msgspec

from shared import archs
from shared.cluster import HostView, cluster_vms, host_views_on
from shared.errors import InsufficientResources
from shared.messages.hardware import HostCaps, HostResources
from shared.messages.vm import Confidential, VmRecord, VmSpec

if TYPE_CHECKING:
    from shared.bus import Bus

MiB = 1 << 20


class Needs(msgspec.Struct, frozen=True, kw_only=True):
    """What a VM asks of its host."""

    memory_mib: int
    arch: str = "x86_64"
    disk_bytes: int = 0
    pool: str = "default"
    uefi: bool = False
    secure_boot: bool = False
    tpm: bool = False
    nested: bool = False
    hostdevs: list[str] = []  # PCI addresses and mdev UUIDs, as the spec names them
    confidential: Confidential = "none"


class Placement(msgspec.Struct, frozen=True, kw_only=True, tag="cluster.placement.v1"):
    """The chosen host, why, and why not each of the others."""

    host: str
    reason: str
    passed_over: dict[str, str] = {}


def needs(spec: VmSpec, *, disk_bytes: int = 0, pool: str = "default") -> Needs:
    """The needs of ``spec``; ``disk_bytes``: room its new disks take (an image's size)."""
    return Needs(memory_mib=spec.memory_mib, arch=spec.arch, disk_bytes=disk_bytes, pool=pool,
                 uefi=spec.firmware == "uefi", secure_boot=spec.secure_boot,
                 tpm=spec.tpm != "none", nested=spec.nested, hostdevs=spec.hostdevs,
                 confidential=spec.confidential)


class DeviceFit(msgspec.Struct, frozen=True, kw_only=True):
    """A VM's host devices as one host has them, counted by what they are there; or why
    that host cannot give them (``refusal``)."""

    gpus: int = 0
    functions: int = 0  # other functions of a passed card (HDMI audio, its USB controller)
    vfs: dict[str, int] = {}  # SR-IOV VFs per PF
    mdevs: dict[str, int] = {}  # mediated devices per type
    other: int = 0  # any other passable function (a NIC, a USB controller)
    refusal: str | None = None

    def summary(self) -> str:
        """``1 GPU (+3 functions), 2 VF(s) of 0000:03:00.0, 1 mdev i915-GVTg_V5_4``."""
        parts = []
        if self.gpus:
            parts.append(f"{self.gpus} GPU(s)"
                         + (f" (+{self.functions} function(s))" if self.functions else ""))
        parts += [f"{n} VF(s) of {pf}" for pf, n in sorted(self.vfs.items())]
        parts += [f"{n} mdev {t}" for t, n in sorted(self.mdevs.items())]
        if self.other:
            parts.append(f"{self.other} other device(s)")
        return ", ".join(parts)


def device_fit(hostdevs: Sequence[str], res: HostResources) -> DeviceFit:
    """What ``hostdevs`` are on the host ``res`` describes, by the vm agent's rule: each PCI
    function passable there and given with all its companions, each mdev made there."""
    passable = {d.address: d for d in res.devices}
    mdev_type = {u.lower(): m.mdev_type for m in res.mdevs for u in m.instances}
    asked = {d.lower() for d in hostdevs}
    companion = {c for d in passable.values() if d.address in asked and d.kind == "gpu"
                 for c in d.companions}
    gpus = functions = other = 0
    vfs: dict[str, int] = {}
    mdevs: dict[str, int] = {}
    for dev in (d.lower() for d in hostdevs):
        if dev in mdev_type:
            mdevs[mdev_type[dev]] = mdevs.get(mdev_type[dev], 0) + 1
            continue
        found = passable.get(dev)
        if found is None:
            return DeviceFit(refusal=_not_here(dev, res))
        if missing := [c for c in found.companions if c not in asked]:
            return DeviceFit(refusal=f"{dev} must be passed with {', '.join(missing)} "
                                     "(the other functions of its card)")
        if found.physfn:
            vfs[found.physfn] = vfs.get(found.physfn, 0) + 1
        elif found.kind == "gpu":
            gpus += 1
        elif dev in companion:
            functions += 1
        else:
            other += 1
    return DeviceFit(gpus=gpus, functions=functions, vfs=vfs, mdevs=mdevs, other=other)


def _not_here(dev: str, res: HostResources) -> str:
    if ":" in dev:
        return (f"no passable device {dev} (not there, or bound to a host driver it cannot "
                "leave: see `phyllome hw list`)")
    room = [f"{m.mdev_type} on {m.parent} ({m.available} free)" for m in res.mdevs
            if m.available]
    return (f"no mediated device {dev}; make one with `phyllome hw mdev create PARENT TYPE "
            f"--uuid {dev}`" + (f" (types with room: {', '.join(room)})" if room else ""))


def committed_mib(records: Iterable[VmRecord]) -> dict[str, int]:
    """Memory promised per host: every VM defined there, running or not."""
    out: dict[str, int] = {}
    for r in records:
        out[r.host] = out.get(r.host, 0) + r.spec.memory_mib
    return out


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def refusal(view: HostView, need: Needs, committed: int) -> str | None:
    """Why ``view`` cannot take the VM, or None when it can."""
    if view.state != "up":
        return f"down ({view.reason or 'no heartbeat'})"
    missing = [a for a in ("vm", "storage", "hardware") if a not in view.agents]
    if missing:
        return f"no {', '.join(missing)} agent running"
    res, caps = view.resources, view.caps
    if res is None:
        return "has not published its resources yet"
    want = need.memory_mib * MiB
    left = memory_left(view, committed)
    if left < want:
        return (f"{_gib(max(left, 0))} memory free after its {committed} MiB of VMs, "
                f"the VM needs {need.memory_mib} MiB")
    pool = view.pools.get(need.pool)
    if pool is None:
        return f"no pool {need.pool!r}"
    if need.disk_bytes and pool.free_bytes < need.disk_bytes:
        return (f"pool {need.pool!r} has {_gib(pool.free_bytes)} free, the disk "
                f"needs {_gib(need.disk_bytes)}")
    nested = caps is not None and bool(caps.nested) and caps.kvm_usable
    if why := arch_refusal(need, res):
        return why
    x86 = need.arch == "x86_64"
    for wanted, have, what in ((x86 and need.uefi, res.uefi, "no UEFI firmware (OVMF)"),
                               (x86 and need.secure_boot, res.secure_boot,
                                "no Secure Boot firmware (OVMF .ms)"),
                               (need.tpm, res.tpm, "no swtpm for an emulated TPM"),
                               (need.nested, nested,
                                "no nested virtualization under a usable KVM")):
        if wanted and not have:
            return what
    if need.confidential != "none" and not confidential(caps, need.confidential):
        return f"no {need.confidential.upper()} under a usable KVM"
    return device_fit(need.hostdevs, res).refusal if need.hostdevs else None


def arch_refusal(need: Needs, res: HostResources) -> str | None:
    """Why the host cannot run a guest of ``need.arch`` (its QEMU, its UEFI firmware), or None.
    A host that publishes no guest archs (from before them) runs x86_64 guests only."""
    if need.arch == "x86_64" and not res.guest_archs:
        return None
    have = next((a for a in res.guest_archs if a.arch == need.arch), None)
    return archs.missing(need.arch, have, uefi=need.uefi, secure_boot=need.secure_boot)


def confidential(caps: HostCaps | None, mode: Confidential) -> bool:
    """Whether the host's hardware agent found ``mode`` on (CPU flag, KVM module parameter)."""
    if caps is None or not caps.kvm_usable:
        return False
    return {"none": True, "sev": caps.sev, "sev-es": caps.sev_es, "sev-snp": caps.sev_snp,
            "tdx": caps.tdx}[mode]


def memory_left(view: HostView, committed: int) -> int:
    """Bytes of memory left on a host: available now, and not promised to its VMs."""
    res = view.resources
    if res is None:
        return 0
    return min(res.memory_available_bytes, res.memory_total_bytes - committed * MiB)


def place(need: Needs, views: Iterable[HostView],
          committed: Mapping[str, int] | None = None) -> Placement:
    """The host for a VM with ``need``; raises InsufficientResources naming every refusal."""
    committed = committed or {}
    fit: list[tuple[int, str]] = []
    fitting: dict[str, HostView] = {}
    passed: dict[str, str] = {}
    for view in views:
        why = refusal(view, need, committed.get(view.host, 0))
        if why is None:
            fit.append((memory_left(view, committed.get(view.host, 0)), view.host))
            fitting[view.host] = view
        else:
            passed[view.host] = why
    if not fit:
        detail = "; ".join(f"{h}: {w}" for h, w in sorted(passed.items())) or "no hosts known"
        raise InsufficientResources(f"no host can take this VM ({detail}); free memory or "
                                    "disk, or ask for less")
    fit.sort(key=lambda f: (-f[0], f[1]))
    left, host = fit[0]
    left -= need.memory_mib * MiB
    others = [h for _, h in fit[1:]]
    for h in others:
        passed[h] = f"fits, with less memory left than {host}"
    res = fitting[host].resources
    devices = device_fit(need.hostdevs, res).summary() if need.hostdevs and res else ""
    extras = [w for w, on in ((need.arch, need.arch != "x86_64"), ("UEFI", need.uefi),
                              ("Secure Boot", need.secure_boot),
                              ("TPM", need.tpm), ("nested", need.nested),
                              (need.confidential.upper(), need.confidential != "none"),
                              (devices, devices)) if on]
    reason = (f"{host}: up, {_gib(left)} memory left after this VM (most of {len(fit)} "
              f"host(s) that fit)" + (f", has {', '.join(extras)}" if extras else ""))
    return Placement(host=host, reason=reason, passed_over=passed)


async def choose(bus: Bus, spec: VmSpec, *, disk_bytes: int = 0,
                 pool: str = "default") -> Placement:
    """``place`` over the cluster as KV shows it now (what ``--host auto`` calls)."""
    views, records = await asyncio.gather(host_views_on(bus), cluster_vms(bus))
    return place(needs(spec, disk_bytes=disk_bytes, pool=pool), views, committed_mib(records))
