"""A real Prometheus (Debian's ``prometheus`` binary) scraping agents, with deploy/'s config.

It runs ``deploy/prometheus/prometheus-cluster.yml`` and its rules, copied into a temporary
directory with two test changes: 1 s scrape and rule evaluation, and every alert's ``for:``
set to 0 s (so an alert fires on the first evaluation that matches). Targets come through
file-based service discovery, as in a cluster. It listens on a free loopback port with its
own data directory -- never the Debian service's 9090 or /var/lib/prometheus -- and is
stopped on exit::

    targets = [{"targets": ["127.0.0.1:41234"], "labels": {"agent": "vm", "host": "h1"}}]
    with running_prometheus(tmp_path / "prom", targets) as prom:
        prom.wait_for(lambda: prom.query('up{agent="vm"} == 1'), "vm scraped")
        prom.alerts()        # [{"labels": {"alertname": ...}, "state": "firing"}, ...]
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx

from tests.support.require import require_binary

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy" / "prometheus"
T = TypeVar("T")
# What Grafana substitutes into a query before Prometheus sees it.
GRAFANA_VARS = {"$__rate_interval": "1m", "$__range": "1h", "$host": ".*"}


def panel_queries() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, PromQL as Prometheus gets it) of every panel target."""
    out = []
    for path in sorted((REPO / "deploy" / "grafana" / "dashboards").glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel["targets"]:
                expr = target["expr"]
                for var, value in GRAFANA_VARS.items():
                    expr = expr.replace(var, value)
                out.append((path.name, panel["title"], expr))
    return out


class QueryError(Exception):
    """Prometheus refused a query (bad PromQL, or it failed while evaluating)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tuned_config(workdir: Path, targets: list[dict[str, Any]], interval: str = "1s") -> Path:
    """deploy/prometheus copied to ``workdir`` with test intervals and ``for: 0s``."""
    config = workdir / "config"
    (config / "rules").mkdir(parents=True)
    (config / "targets").mkdir()
    text = (DEPLOY / "prometheus-cluster.yml").read_text()
    text, n = re.subn(r"(scrape_interval|evaluation_interval|refresh_interval): \S+",
                      rf"\1: {interval}", text)
    assert n == 3, "prometheus-cluster.yml no longer sets the intervals this fixture rewrites"
    (config / "prometheus.yml").write_text(text)
    for rules in DEPLOY.glob("rules/*.yml"):
        (config / "rules" / rules.name).write_text(
            re.sub(r"^(\s+)for: \S+$", r"\1for: 0s", rules.read_text(), flags=re.M))
    (config / "targets" / "test.json").write_text(json.dumps(targets))
    return config / "prometheus.yml"


class Prometheus:
    def __init__(self, url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.url, self.proc, self.log_path = url, proc, log
        self.http = httpx.Client(base_url=url, timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def api(self, path: str, **params: str) -> Any:
        reply = self.http.get(f"/api/v1/{path}", params=params)
        body = reply.json()
        if body.get("status") != "success":
            raise QueryError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector (or scalar as one sample) ``expr`` evaluates to now."""
        data = self.api("query", query=expr)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def series(self, match: str) -> list[dict[str, str]]:
        """Series matching ``match`` stored in the last 5 minutes (whatever their value)."""
        now = time.time()
        return list(self.api("series", **{"match[]": match, "start": str(now - 300),
                                          "end": str(now)}))

    def alerts(self) -> list[dict[str, Any]]:
        return list(self.api("alerts")["alerts"])

    def rules(self) -> list[dict[str, Any]]:
        return [r for g in self.api("rules")["groups"] for r in g["rules"]]

    def wait_for(self, check: Callable[[], T], what: str, timeout: float = 30.0) -> T:
        """Poll ``check`` until it returns something truthy; TimeoutError says ``what``."""
        deadline = time.monotonic() + timeout
        while True:
            result = check()
            if result:
                return result
            if time.monotonic() > deadline:
                raise TimeoutError(f"Prometheus: {what} not seen within {timeout} s")
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n"
                                   f"{self.log()[-3000:]}")
            time.sleep(0.25)


@contextlib.contextmanager
def running_prometheus(workdir: Path, targets: list[dict[str, Any]],
                       interval: str = "1s") -> Iterator[Prometheus]:
    """Start Prometheus on deploy/'s (test-tuned) config; stop it and keep nothing after."""
    binary = require_binary("prometheus")
    workdir.mkdir(parents=True, exist_ok=True)
    config = tuned_config(workdir, targets, interval)
    port = free_port()
    log = workdir / "prometheus.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
             "--storage.tsdb.retention.time=1h"],
            stdout=out, stderr=out, stdin=subprocess.DEVNULL, cwd=workdir)
    prom = Prometheus(f"http://127.0.0.1:{port}", proc, log)
    try:
        def ready() -> bool:
            try:
                return prom.http.get("/-/ready").status_code == 200
            except httpx.TransportError:
                return False

        prom.wait_for(ready, "readiness", timeout=30)
        yield prom
    finally:
        prom.http.close()
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(workdir / "data", ignore_errors=True)
