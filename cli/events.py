"""``phyllome events``: replay and tail the event stream ``PHY_EVENTS`` (the audit log).

    phyllome events --since 1h
    phyllome events --follow --subject 'phy.evt.h1.vm.>' --json

One line per event for people (sizes and rates humanized, nested results in a few words);
progress events only with ``--progress``. ``--json`` writes JSON Lines: one object per event
with every field, progress included.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any

import msgspec

from cli import common
from shared import subjects
from shared.codec import to_builtins

if TYPE_CHECKING:
    from shared.bus import Bus

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
# Fields every event has, said by the line's own columns (or of no use to a reader).
_COMMON = frozenset({"type", "host", "event_id", "time"})
VALUE_WIDTH = 60  # a longer value is cut short: one event, one line


def parse_since(text: str) -> float:
    """``10m``, ``2h``, ``7d``, ``30s`` -> a unix time that far back."""
    m = _DURATION.match(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 30s, 10m, 1h, 7d)")
    seconds = float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    return time.time() - seconds


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("events", help="replay and follow the cluster's events")
    common.add_common(p, json_flag=False)
    p.add_argument("--json", action="store_true",
                   help="JSON Lines: one JSON object per event, every field, progress included")
    p.add_argument("--since", type=parse_since, default=None,
                   help="only events newer than this (30s, 10m, 1h, 7d); default: all")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    p.add_argument("--progress", action="store_true",
                   help="also the progress events of jobs and transfers (many per job)")
    p.add_argument("--subject", default=subjects.EVENTS_ALL,
                   help="subject filter (default %(default)s)")
    p.set_defaults(func=cmd_events)


def is_progress(kind: str) -> bool:
    """``job.progress.v1``, ``storage.transfer_progress.v1``, ...: the many-per-job kind."""
    return "progress" in kind


def event_line(ts: float, body: dict[str, Any]) -> str:
    """``2026-05-01 12:00:03  h1  vm.state_changed  name=demo state=running ...``"""
    stamp = datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")
    kind = str(body.get("type", "?")).rsplit(".v", 1)[0]
    fields = []
    for key, value in body.items():
        if key in _COMMON or value in (None, "", [], {}, False):
            continue
        text = common.humanize(key, value)
        if len(text) > VALUE_WIDTH:
            text = text[:VALUE_WIDTH - 1] + "…"
        fields.append(f"{key}={text}")
    return f"{stamp}  {body.get('host', '-')}  {kind}  {' '.join(fields)}".rstrip()


def cmd_events(args: argparse.Namespace) -> None:
    from shared.contracts import event_decoder

    async def go(bus: Bus) -> int:
        count = 0
        async for subject, ts, data in bus.events(args.subject, since=args.since,
                                                  follow=args.follow):
            try:
                body = to_builtins(event_decoder().decode(data))
            except msgspec.MsgspecError:
                body = {"type": "unknown", "raw": data.decode(errors="replace")}
            if args.json:
                print(json.dumps({"subject": subject, "time": ts, "event": body}), flush=True)
            elif args.progress or not is_progress(str(body.get("type", ""))):
                print(event_line(ts, body), flush=True)
            else:
                continue
            count += 1
        return count

    count = common.call(args, go)
    if count == 0 and not args.json:
        print("no events")
