"""Several hosts on this machine for the cluster tests: a network and mount namespace each.

    with Hosts(tmp_path, ["a", "b", "c"]) as hosts:
        a = hosts["a"]                      # a.addr == "10.77.0.1"
        a.popen(["nats-server", ...], log=tmp_path / "a.log")   # runs inside host a
        a.run(["phyllome", "hosts", "--json"])                  # CompletedProcess
        a.start_libvirtd()                  # its own libvirtd + virtlogd (FACTS.md)
        hosts.cut("a"); hosts.restore("a")  # its link down / up
        a.kill_all()                        # SIGKILL everything running in host a

        cluster = Cluster(hosts, tmp_path)  # `phyllome up --cluster-routes ...` in each host
        cluster.wait_up()
        cluster.cli("a", "hosts", "--json"); cluster.py("b", "async def main(bus): ...")

Each host is a network namespace ``phyt-<pid>-<name>`` with a veth pair on a bridge
``phb<pid>`` in the root namespace (no address there: traffic stays between the test's
own namespaces), addresses 10.77.0.<n>/24, and a private mount namespace held by an anchor
process, so per-host directories can be bind-mounted over ``/run/libvirt`` and friends.
Leaving the ``with`` (also on failure) kills every process inside, which drops the mounts,
and deletes the namespaces and the bridge. A crashed earlier run is cleaned up at the next
start: its namespaces carry the pid of the test process that made them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.support.libvirt import TEST_HOST_XML
from tests.support.require import require, require_binary, require_root

REPO = Path(__file__).resolve().parents[2]

SUBNET = "10.77.0"
PREFIX = "phyt-"
LIBVIRT_DIRS = ("/run/libvirt", "/var/lib/libvirt", "/var/log/libvirt", "/var/cache/libvirt")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check,
                          timeout=30)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _ns_pids(ns: str) -> list[int]:
    out = _ip("netns", "pids", ns, check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def _kill_ns(ns: str, timeout: float = 10.0) -> None:
    """SIGKILL every process in namespace ``ns`` (all of them started by this module)."""
    deadline = time.monotonic() + timeout
    while pids := _ns_pids(ns):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {pids} of {ns} survive SIGKILL")
        time.sleep(0.05)


def clean_stale() -> None:
    """Remove the namespaces and bridges of earlier test runs whose process is gone."""
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        ns = line.split()[0] if line.split() else ""
        if not ns.startswith(PREFIX):
            continue
        owner = ns[len(PREFIX):].split("-")[0]
        if owner.isdigit() and not _alive(int(owner)):
            _kill_ns(ns)
            _ip("netns", "del", ns, check=False)
            _ip("link", "del", f"phb{owner}", check=False)


class Host:
    """One host: its namespace, address, working directory and processes."""

    def __init__(self, name: str, index: int, ns: str, workdir: Path) -> None:
        self.name = name
        self.index = index
        self.ns = ns
        self.addr = f"{SUBNET}.{index}"
        self.workdir = workdir
        self.anchor: subprocess.Popen[bytes] | None = None
        self.procs: list[subprocess.Popen[bytes]] = []
        self.libvirt = False

    def _enter(self, cwd: Path | None) -> list[str]:
        """nsenter into this host; entering a mount namespace resets the working directory
        to its root, so ``cwd`` is given to nsenter rather than to Popen."""
        assert self.anchor is not None
        wd = [f"--wd={cwd}"] if cwd is not None else []
        return ["nsenter", "-t", str(self.anchor.pid), "-n", "-m", *wd, "--"]

    def popen(self, argv: Sequence[str], *, log: Path, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside this host; stdout and stderr go to ``log``."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            proc = subprocess.Popen([*self._enter(cwd), *argv], stdout=out, stderr=out,
                                    stdin=subprocess.DEVNULL, env=env,
                                    start_new_session=True)
        self.procs.append(proc)
        return proc

    def run(self, argv: Sequence[str], *, env: dict[str, str] | None = None,
            cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside this host and wait for it."""
        return subprocess.run([*self._enter(cwd), *argv], capture_output=True, text=True,
                              env=env, timeout=timeout)

    def kill_all(self) -> None:
        """SIGKILL every process of this host but the anchor (as if the machine died)."""
        anchor = self.anchor.pid if self.anchor else -1
        deadline = time.monotonic() + 10
        while pids := [p for p in _ns_pids(self.ns) if p != anchor]:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if time.monotonic() > deadline:
                raise RuntimeError(f"processes {pids} of host {self.name} survive SIGKILL")
            time.sleep(0.05)
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(1)

    def start_libvirtd(self, timeout: float = 30.0) -> str:
        """Its own virtlogd + libvirtd on per-host dirs; returns the ``qemu:///system`` URI.

        QEMU runs as root here (``user = "+0"`` in this host's qemu.conf), so guest files
        may live under mode-700 test directories.
        """
        require_binary("libvirtd")
        require_binary("virtlogd")
        root = self.workdir / "libvirt"
        etc = root / "etc"
        if not etc.exists():
            shutil.copytree("/etc/libvirt", etc, symlinks=True)
            for defined in (etc / "qemu").glob("*.xml"):  # the main host's domains: not ours
                defined.unlink()
            shutil.rmtree(etc / "qemu" / "autostart", ignore_errors=True)
            with open(etc / "qemu.conf", "a") as conf:
                conf.write('\nuser = "+0"\ngroup = "+0"\n')
        mounts = [f"mount --bind {etc} /etc/libvirt"]
        for d in LIBVIRT_DIRS:
            mine = root / d.strip("/").replace("/", "-")
            mine.mkdir(parents=True, exist_ok=True)
            mounts.append(f"mount --bind {mine} {d}")
        script = " && ".join([*mounts, "virtlogd -d -p /run/libvirt/virtlogd.pid",
                              "libvirtd -d -p /run/libvirt/libvirtd.pid"])
        result = self.run(["sh", "-c", script], timeout=timeout)
        assert result.returncode == 0, f"libvirtd of host {self.name}: {result.stderr}"
        deadline = time.monotonic() + timeout
        while self.run(["virsh", "-c", "qemu:///system", "version"]).returncode != 0:
            assert time.monotonic() < deadline, f"libvirtd of host {self.name} does not answer"
            time.sleep(0.2)
        self.libvirt = True
        return "qemu:///system"


class Hosts:
    """Network namespaces on one bridge; see the module doc."""

    def __init__(self, workdir: Path, names: Sequence[str]) -> None:
        self.workdir = workdir
        self.tag = str(os.getpid())
        self.bridge = f"phb{self.tag}"[:15]
        self.hosts = {n: Host(n, i + 1, f"{PREFIX}{self.tag}-{n}", workdir / n)
                      for i, n in enumerate(names)}

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def __iter__(self) -> Iterator[Host]:
        return iter(self.hosts.values())

    def veth(self, host: Host) -> str:
        return f"phv{self.tag}{host.index}"[:15]

    def __enter__(self) -> Hosts:
        require_root()
        require(shutil.which("ip") is not None and shutil.which("nsenter") is not None,
                "iproute2 and util-linux (ip, nsenter)")
        clean_stale()
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("link", "set", self.bridge, "up")
            for host in self:
                self._add(host)
        except BaseException:
            self.close()
            raise
        return self

    def _add(self, host: Host) -> None:
        host.workdir.mkdir(parents=True, exist_ok=True)
        _ip("netns", "add", host.ns)
        outer, inner = self.veth(host), f"phi{self.tag}{host.index}"[:15]
        _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
        _ip("link", "set", outer, "master", self.bridge, "up")
        _ip("link", "set", inner, "netns", host.ns)
        for args in (("link", "set", "lo", "up"), ("link", "set", inner, "name", "eth0"),
                     ("addr", "add", f"{host.addr}/24", "dev", "eth0"),
                     ("link", "set", "eth0", "up")):
            _ip("-n", host.ns, *args)
        # The anchor holds the host's private mount namespace for as long as the host lives.
        host.anchor = subprocess.Popen(
            ["ip", "netns", "exec", host.ns, "unshare", "-m", "--propagation", "private",
             "sleep", "infinity"], stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 10
        while host.anchor.pid not in _ns_pids(host.ns) or not self._unshared(host):
            assert time.monotonic() < deadline, f"anchor of host {host.name} did not start"
            time.sleep(0.02)

    @staticmethod
    def _unshared(host: Host) -> bool:
        """The anchor has exec'd ``sleep`` inside its own mount namespace."""
        assert host.anchor is not None
        try:
            return os.readlink(f"/proc/{host.anchor.pid}/exe").endswith("sleep")
        except OSError:
            return False

    def cut(self, name: str) -> None:
        """Take host ``name``'s link down (its processes keep running)."""
        _ip("link", "set", self.veth(self[name]), "down")

    def restore(self, name: str) -> None:
        _ip("link", "set", self.veth(self[name]), "up")

    def close(self) -> None:
        """Kill everything inside, delete namespaces and the bridge; safe to call twice."""
        for host in self:
            if host.ns in _ip("netns", "list", check=False).stdout:
                _kill_ns(host.ns)
                _ip("netns", "del", host.ns, check=False)
            for proc in [*host.procs, *([host.anchor] if host.anchor else [])]:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
            _ip("link", "del", self.veth(host), check=False)
        _ip("link", "del", self.bridge, check=False)

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()


class Cluster:
    """``phyllome up --cluster-routes ...`` in every host of ``hosts``: one NATS cluster.

    ``agents`` per host (default hardware, storage, vm); a vm agent uses libvirt's test
    driver unless ``libvirt`` names a URI for its host (``Host.start_libvirtd()``); a host in
    ``nats_config`` runs ``up --nats-config FILE --replicas 3`` instead of generated routes.
    """

    def __init__(self, hosts: Hosts, workdir: Path, *, heartbeat_s: float = 1.0,
                 ttl_s: float = 6.0, agents: dict[str, str] | None = None,
                 libvirt: dict[str, str] | None = None,
                 nats_config: dict[str, Path] | None = None) -> None:
        self.hosts = hosts
        self.workdir = workdir
        routes = ",".join(f"nats://{h.addr}:6222" for h in hosts)
        self.up: dict[str, subprocess.Popen[bytes]] = {}
        for h in hosts:
            state = workdir / h.name
            conf = state / "phyllome.toml"
            conf.parent.mkdir(parents=True, exist_ok=True)
            conf.write_text(f"heartbeat_s = {heartbeat_s}\nheartbeat_ttl_s = {ttl_s}\n")
            (state / "libvirt-test-host.xml").write_text(TEST_HOST_XML)
            uri = (libvirt or {}).get(h.name) or f"test://{state / 'libvirt-test-host.xml'}"
            conf_file = (nats_config or {}).get(h.name)
            server = (["--nats-config", str(conf_file), "--replicas", "3"] if conf_file else
                      ["--listen", "0.0.0.0:4222", "--cluster-listen", f"{h.addr}:6222",
                       "--cluster-routes", routes])
            self.up[h.name] = h.popen(
                [sys.executable, "-m", "cli.main", "up", "--host", h.name, "--state-dir",
                 str(state), *server, "--no-demo",
                 "--agents", (agents or {}).get(h.name, "hardware,storage,vm")],
                log=state / "up.log", cwd=REPO, env=self.env(
                    h, nats=False, PHYLLOME_CONFIG=conf, PHYLLOME_LIBVIRT_URI=uri,
                    PHYLLOME_ACCELERATOR="tcg",
                    **{f"PHYLLOME_{a}_METRICS_PORT": 0 for a in ("HARDWARE", "STORAGE", "VM")}))

    def env(self, h: Host, *, nats: bool = True, **extra: Any) -> dict[str, str]:
        """A process's environment in host ``h`` (``up`` starts the server: no NATS URL)."""
        env = env_for(PHYLLOME_HOST=h.name, PHYLLOME_STATE_DIR=self.workdir / h.name,
                      PHYLLOME_NATS_URL="nats://127.0.0.1:4222", PHYLLOME_CONNECT_WAIT=10,
                      COLUMNS=200, **extra)
        if not nats:
            del env["PHYLLOME_NATS_URL"]
        return env

    def wait_up(self, timeout: float = 100.0) -> None:
        deadline = time.monotonic() + timeout
        pending = set(self.up)
        while pending:
            for name in list(pending):
                log = (self.workdir / name / "up.log").read_text(errors="replace")
                if f"phyllome is up on host {name}" in log:
                    pending.discard(name)
                elif self.up[name].poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"host {name} did not come up:\n{log[-3000:]}\n"
                                         f"{self.logs(name)}")
            time.sleep(0.2)

    def logs(self, name: str) -> str:
        logs = sorted((self.workdir / name / "logs").glob("*.log"))
        return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-1500:]}" for p in logs)

    def cli(self, host: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        h = self.hosts[host]
        return h.run([sys.executable, "-m", "cli.main", *args], cwd=REPO, env=self.env(h),
                     timeout=timeout)

    @staticmethod
    def script(host: str, code: str) -> str:
        """A program running ``async def main(bus)`` of ``code``, printing its JSON result."""
        return (
            "import asyncio, json, time\nfrom shared.bus import Bus\n"
            "from shared.messages import catalogue as catalogue_api, hardware as hardware_api\n"
            "from shared.messages import storage as storage_api, vm as vm_api\n" + code +
            "\nasync def _go():\n"
            f"    bus = await Bus.connect('nats://127.0.0.1:4222', name='t', host='{host}',"
            " give_up_after=10)\n"
            "    try:\n        print(json.dumps(await main(bus)), flush=True)\n"
            "    finally:\n        await bus.close()\nasyncio.run(_go())\n")

    def py(self, host: str, code: str, timeout: float = 120) -> Any:
        """Run ``async def main(bus)`` of ``code`` inside ``host``; returns its JSON result."""
        h = self.hosts[host]
        result = h.run([sys.executable, "-c", self.script(host, code)], cwd=REPO,
                       env=self.env(h), timeout=timeout)
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads(result.stdout.splitlines()[-1])

    def py_background(self, host: str, code: str, log: Path) -> subprocess.Popen[bytes]:
        """``py`` without waiting: its output goes to ``log``."""
        h = self.hosts[host]
        return h.popen([sys.executable, "-c", self.script(host, code)], log=log, cwd=REPO,
                       env=self.env(h))

    def hosts_json(self, via: str, timeout: float = 30) -> dict[str, dict[str, Any]]:
        """``phyllome hosts --json``, retried while JetStream elects new leaders (exit 3)."""
        deadline = time.monotonic() + timeout
        while (result := self.cli(via, "hosts", "--json")).returncode == 3:
            assert time.monotonic() < deadline, result.stderr
            time.sleep(0.5)
        assert result.returncode in (0, 1) and result.stdout, result.stderr
        return {v["host"]: v for v in json.loads(result.stdout)}


def env_for(**values: Any) -> dict[str, str]:
    """``os.environ`` plus ``values`` as strings (the environment of a host's process)."""
    return {**os.environ, **{k: str(v) for k, v in values.items()}}
