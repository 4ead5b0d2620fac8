"""The ``phyllome`` command.

    phyllome up --detach        start NATS and the agents of this host
    phyllome status --json      every agent of every host
    phyllome events --since 1h  what happened
"""

from __future__ import annotations

import argparse
import importlib
import sys

from cli import common

# Each module adds its subcommands with register(subparsers).
COMMANDS = ("up", "status", "events", "hosts", "hw", "vm", "storage", "images")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="phyllome", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"cli.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"cli.{name}":
                raise
            continue
        module.register(sub)
    return p


def main(argv: list[str] | None = None) -> None:
    p = parser()
    args = p.parse_args(argv)
    if not getattr(args, "func", None):
        p.print_help()
        sys.exit(common.EXIT_USAGE)
    args.func(args)


if __name__ == "__main__":
    main()
