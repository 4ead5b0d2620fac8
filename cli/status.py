"""``phyllome status``: every agent of every host, from ``$SRV.PING`` and the heartbeats in KV.

An agent is healthy when it answers its ping and its heartbeat is fresh. A host with a
heartbeat in KV whose agent does not answer is listed with ``healthy: false``. What an agent
found wrong on its host (its heartbeat's ``problems``, e.g. ``/dev/kvm`` closed to QEMU) is
listed under the table with the fix, and in ``--json`` as each row's ``problems``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING, Any

from cli import common
from shared import subjects
from shared.codec import to_builtins
from shared.messages.hosts import Heartbeat

if TYPE_CHECKING:
    from shared.bus import Bus


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("status", help="the agents of every host and their health")
    common.add_common(p)
    p.add_argument("--window", type=float, default=0.5,
                   help="at most this many seconds to wait for the agents known in KV to "
                        "answer their ping (default %(default)s)")
    p.set_defaults(func=cmd_status)


async def collect_on(bus: Bus, window: float) -> list[dict[str, Any]]:
    """One row per agent: its heartbeat in KV and its answer to ``$SRV.PING``.

    The ping goes out first and the heartbeats are read while the answers arrive; once every
    agent with a heartbeat has answered there is nothing left to wait for, so ``window`` is
    waited out only when one of them is silent (down or slow) or when KV knows no agent.
    """
    import nats.errors

    now = time.time()
    inbox = bus.nc.new_inbox()
    sub = await bus.nc.subscribe(inbox)
    pings: list[dict[str, Any]] = []
    try:
        await bus.nc.publish("$SRV.PING", b"", reply=inbox)
        deadline = time.monotonic() + window
        beats = await bus.kv_values(subjects.KV_HOSTS, Heartbeat)
        silent = {(hb.host, hb.agent) for hb in beats}
        while silent or not beats:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                msg = await sub.next_msg(timeout=left)
            except nats.errors.TimeoutError:
                break
            ping = _agent_ping(msg.data)
            if ping is not None:
                pings.append(ping)
                silent.discard((ping["metadata"]["host"], ping["name"].removeprefix("phyllome-")))
    finally:
        await sub.unsubscribe()
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for hb in beats:
        rows[(hb.host, hb.agent)] = {
            "host": hb.host, "agent": hb.agent, "version": hb.version,
            "uptime_s": round(now - hb.started, 1), "healthy": False,
            "metrics_url": hb.metrics_url, "heartbeat_age_s": round(now - hb.time, 1),
            "problems": to_builtins(hb.problems),
        }
    for ping in pings:
        meta = ping["metadata"]
        agent = ping["name"].removeprefix("phyllome-")
        row = rows.setdefault((meta["host"], agent), {
            "host": meta["host"], "agent": agent, "heartbeat_age_s": None, "problems": []})
        started = float(meta.get("started", now))
        row.update(version=ping.get("version", ""), uptime_s=round(now - started, 1),
                   metrics_url=meta.get("metrics_url", ""), healthy=True)
    for host in {h for h, _ in rows}:  # a host we know of misses an agent: say so
        for agent in subjects.SERVICES:
            rows.setdefault((host, agent), {
                "host": host, "agent": agent, "version": "", "uptime_s": None,
                "healthy": False, "metrics_url": "", "heartbeat_age_s": None, "problems": []})
    return sorted(rows.values(), key=lambda r: (r["host"], r["agent"]))


def _agent_ping(data: bytes) -> dict[str, Any] | None:
    """A ``$SRV.PING`` reply of a Phyllome agent (name ``phyllome-<agent>``, metadata with
    its host), else None."""
    try:
        ping = json.loads(data)
    except ValueError:
        return None
    if not isinstance(ping, dict):
        return None
    meta = ping.get("metadata")
    if not str(ping.get("name", "")).startswith("phyllome-") or not isinstance(meta, dict) \
            or "host" not in meta:
        return None
    return ping


async def collect(url: str, window: float = 0.5) -> list[dict[str, Any]]:
    from shared.bus import Bus

    bus = await Bus.connect(url, name="phyllome-status", host="-", give_up_after=3,
                            **common.credentials())
    try:
        return await collect_on(bus, window)
    finally:
        await bus.close()


def cmd_status(args: argparse.Namespace) -> None:
    rows = common.call(args, lambda bus: collect_on(bus, args.window))
    if args.json:
        common.print_json(rows)
    elif not rows:
        print("no agents answer; start them with `phyllome up`")
    else:
        common.print_table(rows, [("host", "HOST"), ("agent", "AGENT"), ("version", "VERSION"),
                                  ("uptime_s", "UPTIME S"), ("healthy", "HEALTHY"),
                                  ("metrics_url", "METRICS")])
        for r in rows:
            for p in r["problems"]:
                print(f"\n{r['host']} {r['agent']}: {p['what']}\n  fix: {p['fix']}")
    if not rows or not all(r["healthy"] for r in rows):
        sys.exit(common.EXIT_FAILED)



