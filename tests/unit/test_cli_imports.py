"""What the ``phyllome`` command imports before it knows what it is asked to do.

Every command pays for what ``cli.main`` and the parsers import, so they import none of the
heavy modules (rich, nats-py's JetStream, prometheus_client, libvirt): a command loads its own
code when it runs. Checked in a fresh interpreter, by the modules it holds, not by a timing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("rich", "nats.js", "prometheus_client", "libvirt")


def heavy_after(code: str) -> list[str]:
    """The heavy modules a fresh interpreter holds after running ``code``."""
    probe = (f"import sys\n{code}\nimport json\n"
             f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
             f"{[h.split('.')[0] for h in HEAVY]!r})))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin"})
    assert done.returncode == 0, done.stderr
    held: list[str] = json.loads(done.stdout)
    return [m for m in held if any(m == h or m.startswith(f"{h}.") for h in HEAVY)]


def test_importing_cli_main_loads_no_heavy_module() -> None:
    assert heavy_after("import cli.main") == []


def test_every_parser_of_phyllome_help_loads_no_heavy_module() -> None:
    # `phyllome --help` registers every command: their modules' imports are paid here
    assert heavy_after("import cli.main\ncli.main.parser(['--help'])") == []


@pytest.mark.parametrize("argv", [["status"], ["vm", "list"], ["storage", "volumes"],
                                  ["hw", "report"], ["up"], ["events"], ["hosts"]])
def test_parsing_a_command_loads_no_heavy_module(argv: list[str]) -> None:
    assert heavy_after(f"import cli.main\ncli.main.parser({argv!r}).parse_args({argv!r})") == []


def test_the_bus_without_an_agent_loads_no_metrics() -> None:
    # the CLI connects through shared.bus; the metrics are the agents' (passed in, typed only)
    assert not [m for m in heavy_after("import shared.bus") if m.startswith("prometheus_client")]


def test_the_check_sees_a_heavy_import() -> None:
    # the console is made on first use: then rich is loaded, and the check says so
    assert {"rich", "rich.console"} <= set(heavy_after("import cli.common\ncli.common.console"))
