"""``phyllome hosts``: every host of the cluster, up or down, with its capabilities and room.

Read from the replicated KV buckets (heartbeats in ``hosts``, VM records in ``vms``) and the
host events, not by asking each host, so a host that died is still listed, as ``down``::

    phyllome hosts
    HOST  STATE  AGENTS  VMS  CPUS  MEM FREE  POOL FREE  CAPS         BEAT   WHY DOWN
    a     up     all     12   8     21.4 GiB  310.2 GiB  kvm uefi +3  0.3 s  -
    c     down   -       4    -     -         -          -            -      no heartbeat

``AGENTS`` is ``all`` when the four run, else those that do; ``CAPS`` shows the first two
capabilities and how many more (``--json`` has them all); ``WHY DOWN`` only when a host is.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from cli import common
from shared import subjects

if TYPE_CHECKING:
    from shared.bus import Bus
    from shared.cluster import HostView


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("hosts", help="every host of the cluster: up/down, capabilities, room")
    common.add_common(p)
    p.set_defaults(func=cmd_hosts)


def caps_words(view: HostView) -> list[str]:
    """What a host offers VMs, in the words placement uses."""
    res, caps = view.resources, view.caps
    has = {"kvm": caps is not None and caps.kvm_usable,
           "uefi": res is not None and res.uefi,
           "secure-boot": res is not None and res.secure_boot,
           "tpm": res is not None and res.tpm,
           "nested": caps is not None and bool(caps.nested)}
    words = [w for w, ok in has.items() if ok]
    if res is not None:
        counts = (("gpu", sum(d.kind == "gpu" and not d.physfn for d in res.devices)),
                  ("vf", sum(bool(d.physfn) for d in res.devices)),
                  ("mdev", sum(m.available + len(m.instances) for m in res.mdevs)))
        words += [f"{name}×{n}" for name, n in counts if n]
    return words


CAPS_SHOWN = 2


def row(view: HostView) -> dict[str, Any]:
    res = view.resources
    pools_free = [p.free_bytes for p in view.pools.values()]
    caps = caps_words(view)
    more = f" +{len(caps) - CAPS_SHOWN}" if len(caps) > CAPS_SHOWN else ""
    return {
        "host": view.host, "state": view.state,
        "agents": "all" if set(view.agents) >= set(subjects.SERVICES) else
        " ".join(view.agents) or None,
        "vms": view.vms, "cpus": res.cpus if res else None,
        "memory_free": common.human_bytes(res.memory_available_bytes) if res else None,
        "pool_free": common.human_bytes(max(pools_free)) if pools_free else None,
        "caps": " ".join(caps[:CAPS_SHOWN]) + more or None,
        "last_beat_s": view.age_s, "reason": view.reason or None,
    }


def cmd_hosts(args: argparse.Namespace) -> None:
    from shared.cluster import host_views_on

    async def go(bus: Bus) -> list[HostView]:
        return await host_views_on(bus)

    views = common.call(args, go)
    if args.json:
        common.print_json(views)
    elif not views:
        print("no hosts: no agent has written a heartbeat; start them with `phyllome up`")
    else:
        down = any(v.state == "down" for v in views)
        common.print_table([row(v) for v in views], [
            ("host", "HOST"), ("state", "STATE"), ("agents", "AGENTS"), ("vms", "VMS"),
            ("cpus", "CPUS"), ("memory_free", "MEM FREE"), ("pool_free", "POOL FREE"),
            ("caps", "CAPS"), ("last_beat_s", "BEAT"), *([("reason", "WHY DOWN")] if down else [])])
    if any(v.state == "down" for v in views):
        sys.exit(common.EXIT_FAILED)
