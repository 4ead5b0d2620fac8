"""What a ``phyllome`` process imports before it has parsed its arguments, and on the way of
a one-shot request: the CLI answers in about the time of ``virsh list`` only while nats-py,
asyncio, rich and prometheus_client stay out (docs/benchmarks.md, the CLI rows).

Each check runs in a fresh interpreter, as a user's command does.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cli.main import COMMANDS

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.unit
HEAVY = ("nats", "rich", "prometheus_client", "asyncio", "shared.bus", "shared.metrics")


def heavy_after(code: str) -> list[str]:
    """The modules of ``HEAVY`` that running ``code`` in a new interpreter imported."""
    probe = (f"{code}\nimport json, sys\n"
             f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return list(json.loads(done.stdout.splitlines()[-1]))


def test_building_every_parser_imports_none_of_the_heavy_modules() -> None:
    """``phyllome --help`` builds the parser of every command."""
    assert heavy_after("from cli.main import parser; parser([])") == []


def test_each_command_s_parser_alone_imports_none() -> None:
    code = "\n".join(f"parser([{name!r}]).format_help()" for name in COMMANDS)
    assert heavy_after(f"from cli.main import parser\n{code}") == []


def test_a_one_shot_request_goes_without_them() -> None:
    """The way of ``vm list``, ``storage volumes`` and ``status``: parse, connect through
    ``cli.syncbus``, decode the reply, print the table (no server here: it ends unreachable,
    having imported all it would)."""
    code = """
import contextlib, io
from cli.main import main
for argv in (["vm", "list"], ["status"], ["storage", "volumes"]):
    with contextlib.suppress(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        main([*argv, "--nats", "nats://127.0.0.1:1"])
from cli import common, status, syncbus
from shared.messages import vm
common.print_table([{"a": 1}], [("a", "A")])
status.rows_of([], [], 0.0)
"""
    assert heavy_after(f"import os\nos.environ['PHYLLOME_CONNECT_WAIT'] = '0'\n{code}") == []
