"""Each agent's NATS identity may call exactly the peer endpoints its code calls.

The code's peer calls are read from the source: every ``<...>bus.call(<host>, <spec>, ...)``
in the code an agent runs, where ``<spec>`` is a spec constant (``storage_api.INFO``) or
``contracts.spec("<svc>", "<verb>")`` (a verb given by a parameter is followed to the
function's callers in the same file), and every ``wait_job(<bus>, <host>, "<svc>", ...)``,
which asks that agent's ``job`` endpoint. A call whose host is ``self.host`` (or
``self.agent.host``) reaches the agent's own host; any other host expression may be any host.
``shared.security.PEER_CALLS`` must hold each call, and nothing the code does not call.

    calls = peer_calls(Path("services/storage/transfer.py"))
    # {("storage", "receive", "any"), ("storage", "receive_commit", "any"), ...}
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path
from typing import Any

import pytest

from services.storage import transfer
from shared import contracts, security, subjects
from shared.messages import EndpointSpec

REPO = Path(__file__).resolve().parents[2]
AGENTS = subjects.SERVICES
# shared/jobs.py: wait_job asks the job endpoint of the service its caller names; the
# callers' wait_job(...) are scanned instead.
WAIT_JOB = REPO / "shared" / "jobs.py"

Call = tuple[str, str, str]  # (service, verb, "own" | "any")


def agent_sources(agent: str) -> list[Path]:
    """The files whose peer calls run under ``agent``'s identity."""
    return sorted((REPO / "services" / agent).rglob("*.py"))


def _imports(tree: ast.Module) -> dict[str, str]:
    """Local name -> dotted name, from the module's absolute imports."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                names[a.asname or a.name] = a.name
    return names


def _resolve(dotted: str) -> Any:
    """A module, or an attribute of one, by its dotted name."""
    try:
        return importlib.import_module(dotted)
    except ModuleNotFoundError:
        module, _, attr = dotted.rpartition(".")
        if not module:
            raise
        return getattr(_resolve(module), attr)


class Scan:
    """The peer calls of one source file."""

    def __init__(self, source: str, where: str) -> None:
        self.tree = ast.parse(source)
        self.where = where
        self.names = _imports(self.tree)
        self.enclosing: dict[ast.AST, ast.FunctionDef | ast.AsyncFunctionDef] = {}
        for node in ast.walk(self.tree):  # outer functions first: inner ones overwrite
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    self.enclosing[inner] = node

    def fail(self, node: ast.AST, why: str) -> str:
        return f"{self.where}:{getattr(node, 'lineno', '?')}: {why}"

    def _dotted(self, node: ast.expr) -> Any:
        head, _, rest = ast.unparse(node).partition(".")
        if head not in self.names:
            raise AssertionError(self.fail(node, f"{ast.unparse(node)} is not imported"))
        return _resolve(f"{self.names[head]}.{rest}" if rest else self.names[head])

    def _literal(self, node: ast.expr, call: ast.Call) -> list[str]:
        """The strings ``node`` can be: a constant, or a parameter its callers pass one to."""
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return [node.value]
        func = self.enclosing.get(call)
        params = [a.arg for a in func.args.args] if func else []
        if not isinstance(node, ast.Name) or func is None or node.id not in params:
            raise AssertionError(self.fail(call, f"cannot tell which endpoint "
                                           f"{ast.unparse(call)} calls: pass a spec constant "
                                           "(storage_api.INFO)"))
        index = params.index(node.id) - (1 if params[0] in ("self", "cls") else 0)
        found = []
        for c in ast.walk(self.tree):
            if not isinstance(c, ast.Call) or getattr(c.func, "attr", getattr(
                    c.func, "id", None)) != func.name:
                continue
            given = [k.value for k in c.keywords if k.arg == node.id]
            given += c.args[index:index + 1]
            found += [v for g in given for v in self._literal(g, c)]
        if not found:
            raise AssertionError(self.fail(call, f"{func.name}() is never called with a "
                                           f"literal {node.id}"))
        return found

    def _specs(self, node: ast.expr) -> list[EndpointSpec[Any, Any]]:
        if isinstance(node, ast.Call) and self._dotted(node.func) is contracts.spec:
            services = self._literal(node.args[0], node)
            verbs = self._literal(node.args[1], node)
            return [contracts.spec(s, v) for s in services for v in verbs]
        spec = self._dotted(node)
        if not isinstance(spec, EndpointSpec):
            raise AssertionError(self.fail(node, f"{ast.unparse(node)} is not an EndpointSpec"))
        return [spec]

    def calls(self) -> set[Call]:
        found: set[Call] = set()
        for node in ast.walk(self.tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id == "wait_job"):
                if len(node.args) < 3:
                    raise AssertionError(self.fail(node, "wait_job without (bus, host, svc)"))
                host = ast.unparse(node.args[1])
                reach = "own" if host in ("self.host", "self.agent.host") else "any"
                found |= {(svc, "job", reach) for svc in self._literal(node.args[2], node)}
                continue
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "call"
                    and ast.unparse(node.func.value).split(".")[-1] == "bus"):
                continue
            if len(node.args) < 2:
                raise AssertionError(self.fail(node, "bus.call without (host, spec)"))
            host = ast.unparse(node.args[0])
            reach = "own" if host in ("self.host", "self.agent.host") else "any"
            found |= {(s.service, s.verb, reach) for s in self._specs(node.args[1])}
        return found

    def subjects(self) -> set[tuple[str, str]]:
        """(service, verb) of every command subject the file spells itself."""
        return {(c.args[1].value, c.args[2].value) for c in ast.walk(self.tree)
                if isinstance(c, ast.Call) and ast.unparse(c.func) == "subjects.command"
                and all(isinstance(a, ast.Constant) for a in c.args[1:3])}


def peer_calls(path: Path) -> set[Call]:
    return Scan(path.read_text(), str(path.relative_to(REPO))).calls()


def code_calls(agent: str) -> set[Call]:
    return {c for path in agent_sources(agent) for c in peer_calls(path)}


def table_calls(agent: str) -> set[Call]:
    return {(s.service, s.verb, reach) for reach, specs in security.PEER_CALLS[agent].items()
            for s in specs}


@pytest.mark.parametrize("agent", AGENTS)
def test_every_peer_call_of_the_code_is_in_the_table(agent: str) -> None:
    table = table_calls(agent)
    missing = sorted((svc, verb, reach) for svc, verb, reach in code_calls(agent)
                     if (svc, verb, reach) not in table and (svc, verb, "any") not in table)
    assert missing == [], (
        f"the {agent} agent calls these peer endpoints and its identity may not: add them to "
        "shared/security.py PEER_CALLS")


@pytest.mark.parametrize("agent", AGENTS)
def test_the_table_holds_nothing_the_code_does_not_call(agent: str) -> None:
    code = code_calls(agent)
    unused = sorted(set(table_calls(agent)) - code)
    assert unused == [], f"PEER_CALLS[{agent!r}] grants calls its code never makes"
    twice = [(svc, verb) for svc, verb, reach in table_calls(agent)
             if reach == "own" and (svc, verb, "any") in table_calls(agent)]
    assert twice == [], f"PEER_CALLS[{agent!r}] has these under 'own' and 'any'"


@pytest.mark.parametrize("agent", AGENTS)
def test_raw_subjects_an_agent_spells_are_in_the_table(agent: str) -> None:
    spelled = {s for path in agent_sources(agent)
               for s in Scan(path.read_text(), path.name).subjects()}
    assert spelled == set(security.PEER_SUBJECTS.get(agent, ()))
    if agent == "storage":
        assert transfer.chunk_subject("h2") == subjects.command("h2", "storage", "chunk")


def test_no_other_shared_module_calls_peers() -> None:
    """Code in shared/ runs under whichever agent imports it: a peer call there could hide
    from the scan. The one allowed is wait_job's, whose callers are scanned."""
    callers = [str(p.relative_to(REPO)) for p in sorted((REPO / "shared").rglob("*.py"))
               if p != WAIT_JOB and peer_calls(p)]
    assert callers == []


def test_the_scanner_resolves_each_way_of_naming_an_endpoint() -> None:
    source = '''
from shared import contracts
from shared.messages import storage as storage_api
from shared.messages.hardware import BOOT_PROBE

class H:
    async def local(self):
        await self.agent.bus.call(self.host, BOOT_PROBE, None)
        await self._wait("storage")

    async def _wait(self, svc):
        await self.agent.bus.call(self.host, contracts.spec(svc, "job"), None)
        await wait_job(self.agent.bus, target, "catalogue", "id", timeout=1)

async def remote(bus, target):
    await bus.call(target, storage_api.RECEIVE, None)
    await bus.call(target, contracts.spec("vm", "import_state"), None)
    await other.call(target, "not a bus")
'''
    assert Scan(source, "t.py").calls() == {
        ("hardware", "boot_probe", "own"), ("storage", "job", "own"),
        ("catalogue", "job", "any"), ("storage", "receive", "any"),
        ("vm", "import_state", "any")}


@pytest.mark.parametrize(("source", "error"), [
    ("async def f(bus, svc):\n    await bus.call('h', contracts.spec(svc, 'x'), None)\n"
     "from shared import contracts\n", "is never called with a literal svc"),
    ("async def f(bus, s):\n    await bus.call('h', s, None)\n", "s is not imported"),
    ("from shared import contracts\nasync def f(bus, v):\n"
     "    await bus.call('h', contracts.spec('vm', v.x), None)\n",
     "cannot tell which endpoint"),
    ("from shared import subjects\nasync def f(bus):\n"
     "    await bus.call('h', subjects.STREAM, None)\n", "is not an EndpointSpec"),
])
def test_the_scanner_refuses_a_call_it_cannot_name(source: str, error: str) -> None:
    with pytest.raises(AssertionError, match=error):
        Scan(source, "t.py").calls()


def test_permissions_follow_the_table() -> None:
    def publish(role: str, host: str = "") -> list[str]:
        return list(security.permissions(role, host)["publish"]["allow"])

    vm = publish("vm", "h1")
    assert "phy.*.*.*" not in vm
    assert "phy.h1.hardware.boot_probe" in vm and "phy.*.hardware.boot_probe" not in vm
    assert {"phy.*.vm.import_state", "phy.*.vm.export_state", "phy.*.storage.send"} <= set(vm)
    assert not [s for s in vm if s.startswith("phy.") and ".bind" in s]
    storage = publish("storage", "h2")
    assert [s for s in storage if s.startswith("phy.") and not s.startswith("phy.evt.")] == [
        "phy.*.storage.chunk", "phy.*.storage.pools", "phy.*.storage.receive",
        "phy.*.storage.receive_abort", "phy.*.storage.receive_commit"]
    for role in ("hardware", "catalogue"):
        assert [s for s in publish(role, "h1") if s.startswith("phy.")] == [
            f"phy.evt.h1.{role}.>"]
    denied = security.permissions("operator")["publish"]["deny"]
    for spec in security.AGENT_ONLY:
        assert f"phy.*.{spec.service}.{spec.verb}" in denied
    assert "phy.*.storage.chunk" in denied


def test_agent_only_endpoints_are_called_by_an_agent_and_never_by_the_cli() -> None:
    called = {(svc, verb) for a in AGENTS for svc, verb, _ in table_calls(a)}
    assert [s.verb for s in security.AGENT_ONLY if (s.service, s.verb) not in called] == []
    only = {(s.service, s.verb) for s in security.AGENT_ONLY}
    used = []
    for path in sorted((REPO / "cli").rglob("*.py")):
        scan = Scan(path.read_text(), path.name)
        for node in ast.walk(scan.tree):
            if isinstance(node, ast.Attribute) and ast.unparse(node).split(".")[0] in scan.names:
                try:
                    spec = scan._dotted(node)
                except (AttributeError, ModuleNotFoundError):
                    continue
                if isinstance(spec, EndpointSpec) and (spec.service, spec.verb) in only:
                    used.append(f"{path.name}: {spec.service}.{spec.verb}")
    assert used == [], "the operator identity may not call these; the CLI must not offer them"
