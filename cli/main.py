"""The phyllome command.

    phyllome up --detach        # start NATS and the agents of this host
    phyllome status --json      # every agent of every host
    phyllome events --since 1h  # what happened
    phyllome jobs list --all    # long work running on any host
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
from typing import Any, cast

# Subcommand -> the module whose register(subparsers) adds it. Only the module of the
# command asked for is imported, so `phyllome hw report` starts as fast as it can.
COMMANDS = {"up": "up", "down": "up", "status": "status", "events": "events",
            "hosts": "hosts", "hw": "hw", "vm": "vm", "storage": "storage", "images": "images",
            "secure": "secure", "jobs": "jobs", "net": "net", "web": "web"}
EXIT_USAGE = 2
_width: list[int] = []


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that asks the terminal's width once: argparse builds a help
    formatter for every argument it adds (to check its metavar), and each asked the terminal,
    a third of the time it takes to build ``phyllome vm``'s 260 arguments. Subcommands'
    parsers are of this class too (``add_subparsers`` makes them of the parent's class)."""

    def _get_formatter(self) -> argparse.HelpFormatter:
        if not _width:
            _width.append(shutil.get_terminal_size().columns - 2)
        make: Any = self.formatter_class  # typeshed's protocol leaves out ``width``
        return cast(argparse.HelpFormatter, make(prog=self.prog, width=_width[0]))


def parser(argv: list[str]) -> argparse.ArgumentParser:
    p = Parser(prog="phyllome", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    wanted = next((a for a in argv if not a.startswith("-")), None)
    modules = [COMMANDS[wanted]] if wanted in COMMANDS else list(dict.fromkeys(COMMANDS.values()))
    for name in modules:
        try:
            module = importlib.import_module(f"cli.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"cli.{name}":
                raise
            continue
        module.register(sub)
    return p


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = parser(argv)
    args = p.parse_args(argv)
    if not getattr(args, "func", None):
        p.print_help()
        sys.exit(EXIT_USAGE)
    try:
        args.func(args)
    except BrokenPipeError:  # `phyllome ... | head`: the reader left, not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


if __name__ == "__main__":
    main()
