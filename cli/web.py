"""``phyllome web token``: the web gateway's API tokens (kept in KV as their sha256 only).

    phyllome web token create alice --role operator      # prints the token, once
    phyllome web token create ci --role viewer --json    # {"token": "phy_...", "name": ...}
    phyllome web token list
    phyllome web token revoke ci

Roles: ``viewer`` reads, ``operator`` also runs VMs, consoles and pulls, ``admin`` also binds
hardware. The browser UI (``phyllome up`` serves it on http://127.0.0.1:9700) asks for a
token once and keeps it in an HttpOnly cookie.
"""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING

from cli import common
from shared.messages.web import ROLES, TokenRecord

if TYPE_CHECKING:
    from shared.bus import Bus


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    web = sub.add_parser("web", help="the web gateway: API tokens")
    cmds = web.add_subparsers(dest="web_command", metavar="COMMAND")
    token = cmds.add_parser("token", help="create, list and revoke API tokens")
    tcmds = token.add_subparsers(dest="token_command", metavar="COMMAND")

    p = tcmds.add_parser("create", help="a new token; printed once, only its hash is kept")
    common.add_common(p)
    p.add_argument("name", help="who or what uses it (letters, digits, - and _)")
    p.add_argument("--role", choices=ROLES, default="viewer",
                   help="viewer reads; operator runs VMs; admin binds hardware "
                        "(default %(default)s)")
    p.set_defaults(func=cmd_create)

    p = tcmds.add_parser("list", help="the tokens' names and roles (never the tokens)")
    common.add_common(p)
    p.set_defaults(func=cmd_list)

    p = tcmds.add_parser("revoke", help="refuse a token from now on")
    common.add_common(p)
    p.add_argument("name")
    p.set_defaults(func=cmd_revoke)


def cmd_create(args: argparse.Namespace) -> None:
    from shared import tokens

    async def go(bus: Bus) -> tuple[str, TokenRecord]:
        return await tokens.create(bus, args.name, args.role)

    token, record = common.call(args, go)
    if args.json:
        common.print_json({"token": token, "name": record.name, "role": record.role})
        return
    print(token)
    common.err_console.print(f"token {record.name!r} ({record.role}) created; it is shown "
                             "only now: keep it safe", highlight=False)


def cmd_list(args: argparse.Namespace) -> None:
    from shared import tokens

    async def go(bus: Bus) -> list[TokenRecord]:
        return sorted((await tokens.records(bus)).values(), key=lambda r: r.name)

    records = common.call(args, go)
    if args.json:
        common.print_json({"tokens": records})
        return
    common.print_table([{"name": r.name, "role": r.role, "by": r.created_by,
                         "created": time.strftime("%Y-%m-%d %H:%M", time.localtime(r.created))}
                        for r in records],
                       [("name", "NAME"), ("role", "ROLE"), ("created", "CREATED"),
                        ("by", "BY")])


def cmd_revoke(args: argparse.Namespace) -> None:
    from shared import tokens

    async def go(bus: Bus) -> TokenRecord:
        return await tokens.revoke(bus, args.name)

    record = common.call(args, go)
    if args.json:
        common.print_json(record)
    else:
        print(f"token {record.name!r} ({record.role}) revoked")
