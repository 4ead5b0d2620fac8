"""Where a new VM goes (``phyllome vm create --host auto``): a pure choice over the host views.

A host qualifies when it is up, runs a vm and a storage agent, and has what the spec needs:
memory (free now, and not promised to the VMs already defined there), room in the pool,
UEFI / Secure Boot firmware, swtpm for a TPM, nested virtualization, bindable GPUs. Among
those, the one with the most memory left after the VM wins (ties: the name), so VMs spread.
The reply names the host and says why, and why every other host was passed over::

    choice = await choose(bus, spec, disk_bytes=10 << 30)   # or place(needs(...), views, ...)
    choice.host, choice.reason   # "b", "b: up, 5.1 GiB memory left after this VM (most of 2 ..."
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import msgspec

from shared.cluster import HostView, cluster_vms, host_views_on
from shared.errors import InsufficientResources
from shared.messages.vm import VmRecord, VmSpec

if TYPE_CHECKING:
    from shared.bus import Bus

MiB = 1 << 20


class Needs(msgspec.Struct, frozen=True, kw_only=True):
    """What a VM asks of its host."""

    memory_mib: int
    disk_bytes: int = 0
    pool: str = "default"
    uefi: bool = False
    secure_boot: bool = False
    tpm: bool = False
    nested: bool = False
    gpus: int = 0


class Placement(msgspec.Struct, frozen=True, kw_only=True, tag="cluster.placement.v1"):
    """The chosen host, why, and why not each of the others."""

    host: str
    reason: str
    passed_over: dict[str, str] = {}


def needs(spec: VmSpec, *, disk_bytes: int = 0, pool: str = "default") -> Needs:
    """The needs of ``spec``; ``disk_bytes``: room its new disks take (an image's size)."""
    return Needs(memory_mib=spec.memory_mib, disk_bytes=disk_bytes, pool=pool,
                 uefi=spec.firmware == "uefi", secure_boot=spec.secure_boot,
                 tpm=spec.tpm != "none", nested=spec.nested, gpus=len(spec.hostdevs))


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
    want = need.memory_mib * MiB
    left = memory_left(view, committed)
    if left < want:
        return (f"{_gib(max(left, 0))} memory free after its {committed} MiB of VMs, "
                f"the VM needs {need.memory_mib} MiB")
    pool = view.pools.get(need.pool)
    if pool is None:
        return f"no pool {need.pool!r}"
    if need.disk_bytes and pool.get("free_bytes", 0) < need.disk_bytes:
        return (f"pool {need.pool!r} has {_gib(pool.get('free_bytes', 0))} free, the disk "
                f"needs {_gib(need.disk_bytes)}")
    for wanted, have, what in ((need.uefi, res.get("uefi"), "no UEFI firmware (OVMF)"),
                               (need.secure_boot, res.get("secure_boot"),
                                "no Secure Boot firmware (OVMF .ms)"),
                               (need.tpm, res.get("tpm"), "no swtpm for an emulated TPM"),
                               (need.nested, caps.get("nested") and caps.get("kvm_usable"),
                                "no nested virtualization under a usable KVM")):
        if wanted and not have:
            return what
    gpus = len(res.get("gpus_bindable", []))
    if need.gpus > gpus:
        return f"{gpus} bindable GPU(s), the VM needs {need.gpus}"
    return None


def memory_left(view: HostView, committed: int) -> int:
    """Bytes of memory left on a host: available now, and not promised to its VMs."""
    res = view.resources
    return min(int(res.get("memory_available_bytes", 0)),
               int(res.get("memory_total_bytes", 0)) - committed * MiB)


def place(need: Needs, views: Iterable[HostView],
          committed: Mapping[str, int] | None = None) -> Placement:
    """The host for a VM with ``need``; raises InsufficientResources naming every refusal."""
    committed = committed or {}
    fit: list[tuple[int, str]] = []
    passed: dict[str, str] = {}
    for view in views:
        why = refusal(view, need, committed.get(view.host, 0))
        if why is None:
            fit.append((memory_left(view, committed.get(view.host, 0)), view.host))
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
    extras = [w for w, on in (("UEFI", need.uefi), ("Secure Boot", need.secure_boot),
                              ("TPM", need.tpm), ("nested", need.nested),
                              (f"{need.gpus} GPU(s)", need.gpus)) if on]
    reason = (f"{host}: up, {_gib(left)} memory left after this VM (most of {len(fit)} "
              f"host(s) that fit)" + (f", has {', '.join(extras)}" if extras else ""))
    return Placement(host=host, reason=reason, passed_over=passed)


async def choose(bus: Bus, spec: VmSpec, *, disk_bytes: int = 0,
                 pool: str = "default") -> Placement:
    """``place`` over the cluster as KV shows it now (what ``--host auto`` calls)."""
    views, records = await asyncio.gather(host_views_on(bus), cluster_vms(bus))
    return place(needs(spec, disk_bytes=disk_bytes, pool=pool), views, committed_mib(records))
