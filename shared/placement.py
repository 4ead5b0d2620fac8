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

``choose`` reads KV ``hosts`` only: each vm agent's heartbeat says the memory promised to the
VMs defined on its host (``vm_memory_mib``); the VM records are read only for a host whose
heartbeat lacks it (an agent from before the figure). A caller that places many VMs in a row
keeps a ``Recent``: the memory it placed on a host counts against that host's free memory
until the host's heartbeats have caught up with it, so a burst does not pile up on the host
whose last beat happened to report the most::

    recent = Recent()
    for spec in specs:
        choice = await choose(bus, spec, recent=recent)   # then create it on choice.host
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import msgspec

from shared import archs, subjects
from shared.cluster import (
    HeartbeatFollower,
    HostView,
    decode_all,
    heartbeats,
    host_views,
    hosts_ttl,
    read_together,
)
from shared.errors import InsufficientResources
from shared.messages.hardware import HostCaps, HostResources
from shared.messages.hosts import Heartbeat
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


def refusal(view: HostView, need: Needs, committed: int, pending: int = 0) -> str | None:
    """Why ``view`` cannot take the VM, or None when it can; ``pending``: MiB placed there
    since its last beats (``Recent``)."""
    if view.state != "up":
        return f"down ({view.reason or 'no heartbeat'})"
    missing = [a for a in ("vm", "storage", "hardware") if a not in view.agents]
    if missing:
        return f"no {', '.join(missing)} agent running"
    res, caps = view.resources, view.caps
    if res is None:
        return "has not published its resources yet"
    want = need.memory_mib * MiB
    left = memory_left(view, committed, pending)
    if left < want:
        placed = f" and {pending} MiB placed since its last beat" if pending else ""
        return (f"{_gib(max(left, 0))} memory free after its {committed} MiB of VMs{placed}, "
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


def memory_left(view: HostView, committed: int, pending: int = 0) -> int:
    """Bytes of memory left on a host: available now, and not promised to its VMs; ``pending``
    MiB placed there since its last beat count against both (its beat knew nothing of them)."""
    res = view.resources
    if res is None:
        return 0
    return min(res.memory_available_bytes - pending * MiB,
               res.memory_total_bytes - (committed + pending) * MiB)


def promised_mib(views: Iterable[HostView],
                 records: Iterable[VmRecord] | None = None) -> dict[str, int]:
    """Memory promised per host: the figure of its vm agent's heartbeat, else (a heartbeat
    without it) what ``records`` (KV ``vms``) add up to for that host."""
    views = list(views)
    out = {v.host: v.vm_memory_mib for v in views if v.vm_memory_mib is not None}
    lacking = {v.host for v in views if v.vm_memory_mib is None}
    if lacking and records is not None:
        out |= {h: mib for h, mib in committed_mib(records).items() if h in lacking}
    return out


def lacking_figure(views: Iterable[HostView], need: Needs) -> list[str]:
    """Hosts that could take the VM but whose heartbeats do not say what their VMs were
    promised: for those, and only those, the VM records must be read."""
    return sorted(v.host for v in views
                  if v.vm_memory_mib is None and refusal(v, need, 0) is None)


class _Placed(msgspec.Struct, kw_only=True):
    host: str
    revision: int  # of the host's vm heartbeat when the VM was placed
    memory_mib: int
    at: float  # monotonic
    newer: int | None = None  # the first newer revision seen


class Recent:
    """Memory this caller placed on hosts whose heartbeats may not count it yet.

    A placement counts against its host until two newer beats of its vm agent were seen (the
    first may have been measured before the VM was defined), or for ``max_age_s`` at most::

        recent.add("b", revision=41, memory_mib=512)     # what choose does after a choice
        recent.pending({"b": 41})                        # {"b": 512}: no newer beat yet
    """

    def __init__(self, max_age_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_age_s = max_age_s
        self.clock = clock
        self._placed: list[_Placed] = []

    def add(self, host: str, revision: int, memory_mib: int) -> None:
        self._placed.append(_Placed(host=host, revision=revision, memory_mib=memory_mib,
                                    at=self.clock()))

    def pending(self, revisions: Mapping[str, int]) -> dict[str, int]:
        """MiB per host placed since the beats of ``revisions`` (host: the revision of its vm
        agent's heartbeat now); forgets what those beats count already."""
        now, kept = self.clock(), []
        out: dict[str, int] = {}
        for p in self._placed:
            rev = revisions.get(p.host)
            if now - p.at > self.max_age_s:
                continue
            if rev is not None and rev > p.revision:
                if p.newer is None:
                    p.newer = rev
                elif rev > p.newer:
                    continue  # a second newer beat: the VM is in its figure
            kept.append(p)
            out[p.host] = out.get(p.host, 0) + p.memory_mib
        self._placed = kept
        return out


def place(need: Needs, views: Iterable[HostView],
          committed: Mapping[str, int] | None = None,
          pending: Mapping[str, int] | None = None) -> Placement:
    """The host for a VM with ``need``; raises InsufficientResources naming every refusal.
    ``committed``: MiB promised per host; ``pending``: MiB placed since its last beat."""
    committed, pending = committed or {}, pending or {}
    fit: list[tuple[int, str]] = []
    fitting: dict[str, HostView] = {}
    passed: dict[str, str] = {}
    for view in views:
        c, p = committed.get(view.host, 0), pending.get(view.host, 0)
        why = refusal(view, need, c, p)
        if why is None:
            fit.append((memory_left(view, c, p), view.host))
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


async def choose(bus: Bus, spec: VmSpec, *, disk_bytes: int = 0, pool: str = "default",
                 recent: Recent | None = None,
                 follower: HeartbeatFollower | None = None) -> Placement:
    """``place`` over the cluster as KV ``hosts`` shows it now (what ``--host auto`` calls);
    KV ``vms`` only for hosts whose heartbeats lack the figure; ``recent``: see ``Recent``.
    A caller that places many keeps a started ``follower`` of KV ``hosts``: what was written
    since its last poll, not every key each time (a key not rewritten for the TTL is left
    out, as the server drops it)."""
    if follower is not None and follower.active:
        ttl, _taken = await read_together(hosts_ttl(bus), follower.poll())
        beats = follower.entries(prune_after=ttl)
    else:
        beats, ttl = await read_together(heartbeats(bus), hosts_ttl(bus))
    views = host_views([hb for _key, _rev, hb in beats], now=time.time(), ttl_s=ttl)
    need = needs(spec, disk_bytes=disk_bytes, pool=pool)
    records = None
    if lacking_figure(views, need):
        (entries,) = await read_together(bus.kv_entries(subjects.KV_VMS))
        records = decode_all(entries, VmRecord)
    revisions = beat_revisions(beats)
    choice = place(need, views, promised_mib(views, records),
                   recent.pending(revisions) if recent is not None else None)
    if recent is not None:
        recent.add(choice.host, revisions.get(choice.host, 0), need.memory_mib)
    return choice


def beat_revisions(beats: Iterable[tuple[str, int, Heartbeat]]) -> dict[str, int]:
    """Per host, the revision of the beat that carries its promised memory (a host without
    the figure: of its newest beat): what ``Recent`` counts beats by."""
    out: dict[str, int] = {}
    figure: set[str] = set()
    for _key, rev, hb in sorted(beats, key=lambda b: b[1]):
        if hb.details.vm_memory_mib is not None:
            out[hb.host] = rev
            figure.add(hb.host)
        elif hb.host not in figure:
            out[hb.host] = rev
    return out
