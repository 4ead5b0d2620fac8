"""``phyllome events``: replay and tail the event stream ``PHY_EVENTS`` (the audit log).

    phyllome events --since 1h
    phyllome events --follow --subject 'phy.evt.h1.vm.>' --json
"""

from __future__ import annotations

import argparse
import json
import re
import time
from datetime import datetime
from typing import TYPE_CHECKING

import msgspec

from cli import common
from shared import subjects
from shared.codec import to_builtins

if TYPE_CHECKING:
    from shared.bus import Bus

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")


def parse_since(text: str) -> float:
    """``10m``, ``2h``, ``7d``, ``30s`` -> a unix time that far back."""
    m = _DURATION.match(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 30s, 10m, 1h, 7d)")
    seconds = float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    return time.time() - seconds


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("events", help="replay and follow the cluster's events")
    common.add_common(p)
    p.add_argument("--since", type=parse_since, default=None,
                   help="only events newer than this (30s, 10m, 1h, 7d); default: all")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    p.add_argument("--subject", default=subjects.EVENTS_ALL,
                   help="subject filter (default %(default)s)")
    p.set_defaults(func=cmd_events)


def cmd_events(args: argparse.Namespace) -> None:
    from shared.contracts import event_decoder

    async def go(bus: Bus) -> int:
        count = 0
        async for subject, ts, data in bus.events(args.subject, since=args.since,
                                                  follow=args.follow):
            count += 1
            try:
                body = to_builtins(event_decoder().decode(data))
            except msgspec.MsgspecError:
                body = {"raw": data.decode(errors="replace")}
            if args.json:
                print(json.dumps({"subject": subject, "time": ts, "event": body}), flush=True)
            else:
                stamp = datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")
                kind = body.pop("type", "?") if isinstance(body, dict) else "?"
                rest = " ".join(f"{k}={v}" for k, v in body.items()
                                if k not in ("host", "event_id", "time"))
                print(f"{stamp}  {subject:<44} {kind:<24} {rest}", flush=True)
        return count

    count = common.call(args, go)
    if count == 0 and not args.json:
        print("no events")
