"""``phyllome status``: every agent of every host, from ``$SRV.PING`` and the heartbeats in KV.

An agent is healthy when it answers its ping and its heartbeat is fresh. A host with a
heartbeat in KV whose agent does not answer is listed with ``healthy: false``. What an agent
found wrong on its host (its heartbeat's ``problems``, e.g. ``/dev/kvm`` closed to QEMU) is
listed under the table with the fix, and in ``--json`` as each row's ``problems``.

It reads KV ``hosts`` first, then pings: the answer comes as soon as every agent with a
heartbeat has answered its ping (``--window`` is how long it waits for one that does not),
through the blocking client of ``cli.syncbus`` (one connection, no nats-py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING, Any

from cli import common
from shared import subjects

if TYPE_CHECKING:
    from cli.syncbus import SyncBus
    from shared.messages.hosts import Heartbeat

Agent = tuple[str, str]  # (host, agent)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("status", help="the agents of every host and their health")
    common.add_common(p)
    p.add_argument("--window", type=float, default=0.5,
                   help="most seconds to wait for ping replies; it ends sooner when every "
                        "agent with a heartbeat has answered (default %(default)s)")
    p.set_defaults(func=cmd_status)


def heartbeats(bus: SyncBus) -> list[Heartbeat]:
    """Every heartbeat in KV ``hosts`` (a record that does not decode is skipped: a newer
    agent may write a newer schema)."""
    import msgspec

    from shared.messages.hosts import Heartbeat

    out = []
    for _key, _rev, value in bus.kv_entries(subjects.KV_HOSTS):
        try:
            out.append(msgspec.json.decode(value, type=Heartbeat))
        except msgspec.MsgspecError:
            continue
    return out


def ping_replies(bus: SyncBus, window: float, expected: set[Agent]) -> list[dict[str, Any]]:
    """``$SRV.PING`` replies, until every agent of ``expected`` answered (with none
    expected, until ``window`` ends) or at most ``window`` seconds."""
    replies: list[dict[str, Any]] = []
    answered: set[Agent] = set()

    def enough(raw: list[bytes]) -> bool:
        if len(raw) > len(replies):
            try:
                reply = json.loads(raw[-1])
            except ValueError:
                reply = {}
            replies.append(reply if isinstance(reply, dict) else {})
            if (agent := phyllome_agent(replies[-1])) is not None:
                answered.add(agent)
        return bool(expected) and expected <= answered

    bus.gather("$SRV.PING", window=window, enough=enough)
    return [r for r in replies if r]


def phyllome_agent(ping: dict[str, Any]) -> Agent | None:
    """(host, agent) of a ping reply of a Phyllome agent, else None."""
    name = str(ping.get("name", ""))
    meta = ping.get("metadata") or {}
    if not name.startswith("phyllome-") or not isinstance(meta, dict) or "host" not in meta:
        return None
    return str(meta["host"]), name.removeprefix("phyllome-")


def rows_of(beats: list[Heartbeat], pings: list[dict[str, Any]],
            now: float) -> list[dict[str, Any]]:
    """One row per (host, agent): from its heartbeat, healthy when it answered its ping; a
    host we know of that misses an agent gets a row saying so."""
    from shared.codec import to_builtins

    rows: dict[Agent, dict[str, Any]] = {}
    for hb in beats:
        rows[(hb.host, hb.agent)] = {
            "host": hb.host, "agent": hb.agent, "version": hb.version,
            "uptime_s": round(now - hb.started, 1), "healthy": False,
            "metrics_url": hb.metrics_url, "heartbeat_age_s": round(now - hb.time, 1),
            "problems": to_builtins(hb.problems),
        }
    for ping in pings:
        agent = phyllome_agent(ping)
        if agent is None:
            continue
        meta = ping["metadata"]
        row = rows.setdefault(agent, {
            "host": agent[0], "agent": agent[1], "heartbeat_age_s": None, "problems": []})
        started = float(meta.get("started", now))
        row.update(version=ping.get("version", ""), uptime_s=round(now - started, 1),
                   metrics_url=meta.get("metrics_url", ""), healthy=True)
    for host in {h for h, _ in rows}:  # a host we know of misses an agent: say so
        for agent_name in subjects.SERVICES:
            rows.setdefault((host, agent_name), {
                "host": host, "agent": agent_name, "version": "", "uptime_s": None,
                "healthy": False, "metrics_url": "", "heartbeat_age_s": None, "problems": []})
    return sorted(rows.values(), key=lambda r: (r["host"], r["agent"]))


def collect_on(bus: SyncBus, window: float) -> list[dict[str, Any]]:
    beats = heartbeats(bus)
    pings = ping_replies(bus, window, {(hb.host, hb.agent) for hb in beats})
    return rows_of(beats, pings, time.time())


def collect(url: str, window: float = 0.5) -> list[dict[str, Any]]:
    """The rows of ``phyllome status`` from the cluster at ``url`` (blocking)."""
    from cli.syncbus import SyncBus

    with SyncBus.connect(url, name="phyllome-status", give_up_after=3,
                         **common.credentials()) as bus:
        return collect_on(bus, window)


def cmd_status(args: argparse.Namespace) -> None:
    rows = common.call_sync(args, lambda bus: collect_on(bus, args.window))
    if args.json:
        common.print_json(rows)
    elif not rows:
        print("no agents answer; start them with `phyllome up`")
    else:
        common.print_table(rows, [("host", "HOST"), ("agent", "AGENT"), ("version", "VERSION"),
                                  ("uptime_s", "UPTIME"), ("healthy", "HEALTHY"),
                                  ("metrics_url", "METRICS")])
        for r in rows:
            for p in r["problems"]:
                print(f"\n{r['host']} {r['agent']}: {p['what']}\n  fix: {p['fix']}")
    if not rows or not all(r["healthy"] for r in rows):
        sys.exit(common.EXIT_FAILED)
