"""What shared/ may import and know, read from the source with ``ast``.

shared/ is what every agent and the CLI import: it must import neither (no ``services``, no
``cli``), have no import circle, and know no agent by name, so that what one agent does for
its host lives in that agent. Only the modules that list the agents on purpose (the
contracts and names, the permissions, the configuration) name them.
"""

from __future__ import annotations

import ast
from pathlib import Path

from shared import subjects

SHARED = Path(__file__).resolve().parents[2] / "shared"
LISTS_AGENTS = {"shared.subjects", "shared.security", "shared.contracts", "shared.config"}


def module_of(path: Path) -> str:
    parts = path.relative_to(SHARED.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_of(p): p for p in SHARED.rglob("*.py")}


def imported(source: str) -> set[str]:
    """Every name a module imports, anywhere in it (``TYPE_CHECKING`` blocks and functions
    too: a circle hidden there is still a circle); ``from a import b`` gives ``a`` and
    ``a.b``, since ``b`` may be a module."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles of ``graph`` (module -> modules it imports), one path each."""
    found: list[list[str]] = []
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            found.append([*path[path.index(node):], node])
            return
        if node in done:
            return
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, [*path, node])
        done.add(node)

    for node in sorted(graph):
        visit(node, [])
    return found


def agent_names_used(source: str) -> list[str]:
    """Where ``source`` compares with an agent's name (``agent.name == "storage"``) or binds
    one to a module constant (``HOST_AGENT = "hardware"``): code that belongs in that agent."""
    agents = set(subjects.SERVICES)
    tree = ast.parse(source)
    hits = []

    def names_agent(node: ast.AST) -> bool:
        return any(isinstance(n, ast.Constant) and n.value in agents for n in ast.walk(node))

    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(
                names_agent(side) for side in (node.left, *node.comparators)):
            hits.append(f"line {node.lineno}: {ast.unparse(node)}")
    for node in tree.body:
        if isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None \
                and names_agent(node.value):
            hits.append(f"line {node.lineno}: {ast.unparse(node)}")
    return hits


def test_shared_imports_no_agent_and_no_cli() -> None:
    wrong = {m: sorted(i for i in imported(p.read_text())
                       if i.split(".")[0] in ("services", "cli"))
             for m, p in MODULES.items()}
    assert {m: i for m, i in wrong.items() if i} == {}


def test_no_import_circle_in_shared() -> None:
    graph = {m: imported(p.read_text()) & MODULES.keys() - {m} for m, p in MODULES.items()}
    assert cycles(graph) == []


def test_shared_knows_no_agent_by_name() -> None:
    hits = {m: agent_names_used(p.read_text()) for m, p in MODULES.items()
            if m not in LISTS_AGENTS and not m.startswith("shared.messages")}
    assert {m: h for m, h in hits.items() if h} == {}


def test_the_checks_see_what_they_look_for() -> None:
    """The old shared/cluster.py: a circle through a TYPE_CHECKING import, agents by name."""
    assert cycles({"shared.agent": {"shared.cluster"}, "shared.cluster": {"shared.jobs"},
                   "shared.jobs": {"shared.agent"}, "shared.bus": set()}) == [
        ["shared.agent", "shared.cluster", "shared.jobs", "shared.agent"]]
    old = '''
from typing import TYPE_CHECKING
from shared import subjects
if TYPE_CHECKING:
    from shared.agent import Agent
HOST_AGENT = "hardware"
def watch(agent):
    if agent.name == HOST_AGENT or agent.name in ("storage",):
        pass
    elif agent.name == "storage" and "pools" in agent.details:
        pass
'''
    assert {"shared.agent", "shared.subjects"} <= imported(old)
    assert [h.split(":")[0] for h in agent_names_used(old)] == ["line 8", "line 10", "line 6"]
