"""``phyllome up`` / ``phyllome down``: the embedded NATS server, the four agents of a host and
its web gateway.

``up`` starts ``nats-server`` (JetStream, data in ``<state dir>/nats``) unless
``PHYLLOME_NATS_URL`` points at a server that answers, then runs each agent and the web
gateway (``--web-listen``, default 127.0.0.1:9700; HTTPS with ``--secure``) as a child
process, restarting one that dies (with backoff), logging to ``<state dir>/logs/``, until
SIGINT/SIGTERM stops them all. ``--detach`` runs the same in the background and returns
once every agent answers; ``down`` stops it.

In a cluster every host runs ``up`` with the same routes (``docs/cluster.md``)::

    phyllome up --listen 0.0.0.0:4222 --cluster-listen 10.0.0.1:6222 \
        --cluster-routes nats://10.0.0.1:6222,nats://10.0.0.2:6222,nats://10.0.0.3:6222

The embedded server then joins the cluster (server name = host name), and with three or
more routes the agents create ``PHY_EVENTS`` and the KV buckets with three replicas.
``--leaf-remotes nats-leaf://10.0.0.1:7422`` joins over one outbound connection instead
(the cluster hosts then run with ``--leaf-listen 0.0.0.0:7422``), and ``--nats-config FILE``
runs a hand-written server config (``deploy/nats/``).

``--build-debian`` (``make up`` passes it) builds the ``phyllome-debian`` guest image
(``deploy/setup.sh debian``: minutes the first time, nothing when it is current) in the
background once the stack serves, logging to ``<state dir>/logs/debian-image.log``, then
refreshes the catalogue, whose ``catalogue.refreshed`` event announces the new entry, and
pulls it into the image pool (the ``image.pulled`` event says when it is there).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from cli import common
from shared import security, subjects
from shared.config import default_host, default_state_dir, load
from shared.errors import PhyError, Unavailable
from shared.natsserver import LEAF_URL, NatsServer, parse_urls

# The web gateway's defaults, spelled here so that `phyllome up --help` needs no web import.
DEFAULT_LISTEN = "127.0.0.1:9700"

RESTART_BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 60.0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("up", help="start NATS and the agents of this host")
    p.add_argument("--detach", "-d", action="store_true", help="run in the background")
    p.add_argument("--state-dir", default=os.environ.get("PHYLLOME_STATE_DIR")
                   or default_state_dir())
    p.add_argument("--host", default=os.environ.get("PHYLLOME_HOST") or default_host())
    p.add_argument("--listen", default="127.0.0.1:4222",
                   help="address of the embedded NATS server (default %(default)s)")
    p.add_argument("--cluster-routes", default=os.environ.get("PHYLLOME_CLUSTER_ROUTES", ""),
                   help="join a NATS cluster: every host's route URL, comma-separated "
                   "(nats://10.0.0.1:6222,...); this host's own is skipped")
    p.add_argument("--cluster-listen", default="",
                   help="where this host takes routes (default: the --listen address, "
                   "port 6222)")
    p.add_argument("--leaf-remotes", default="",
                   help="join over one outbound connection as a leaf node of the cluster "
                   "(nats-leaf://10.0.0.1:7422,...); the cluster's JetStream serves this host")
    p.add_argument("--leaf-listen", default="",
                   help="take leaf nodes on this address (a cluster host: 0.0.0.0:7422)")
    p.add_argument("--nats-config", default="",
                   help="run nats-server with this config file instead of a generated one")
    p.add_argument("--replicas", type=int, choices=(1, 3, 5), default=None,
                   help="JetStream replicas of the events and KV buckets (default: 3 with "
                   "three or more cluster routes, else 1)")
    p.add_argument("--secure", action="store_true",
                   help="users with least-privilege permissions and TLS (identities in "
                        "<state dir>/secure; `phyllome secure init` makes them for a cluster)")
    p.add_argument("--agents", default=",".join(subjects.SERVICES),
                   help="which agents to run (default: all four)")
    p.add_argument("--web-listen", default=os.environ.get("PHYLLOME_WEB_LISTEN", DEFAULT_LISTEN),
                   help="where the web UI and HTTP API listen (default %(default)s)")
    p.add_argument("--no-web", action="store_true", help="do not run the web gateway")
    p.add_argument("--no-demo", action="store_true",
                   help="do not create the demo VM on a host that has none")
    p.add_argument("--build-debian", action="store_true",
                   help="build the phyllome-debian guest image in the background once the "
                   "stack serves (deploy/setup.sh debian; root), then refresh the catalogue")
    p.set_defaults(func=cmd_up)
    d = sub.add_parser("down", help="stop what `phyllome up --detach` started")
    d.add_argument("--state-dir", default=os.environ.get("PHYLLOME_STATE_DIR")
                   or default_state_dir())
    d.set_defaults(func=cmd_down)


def pid_file(state_dir: Path) -> Path:
    return state_dir / "run" / "up.pid"


def secure_marker(state_dir: Path) -> Path:
    """Holds the pid of a running ``phyllome up --secure`` (a plain one writes none)."""
    return state_dir / "run" / "secure"


def running_pid(state_dir: Path) -> int | None:
    try:
        pid = int(pid_file(state_dir).read_text().strip())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def cmd_up(args: argparse.Namespace) -> None:
    import asyncio

    state_dir = Path(args.state_dir)
    if (pid := running_pid(state_dir)) is not None:
        marker = secure_marker(state_dir)
        secure = marker.exists() and marker.read_text().strip() == str(pid)
        if args.secure and not secure:
            at = "" if args.state_dir == default_state_dir() else f" --state-dir {state_dir}"
            common.error(None, "conflict", f"phyllome is running without --secure (pid {pid}): "
                         "anyone who reaches its NATS port may use it; restart it secure: "
                         f"`phyllome down{at} && phyllome up{at} --secure --detach`",
                         common.EXIT_FAILED)
        print(f"phyllome is already running (pid {pid}{', secure' if secure else ''}); "
              "`phyllome status` shows it")
        return
    try:
        parse_urls(args.cluster_routes, "--cluster-routes")  # refuse before detaching
        parse_urls(args.leaf_remotes, "--leaf-remotes", LEAF_URL)
    except PhyError as e:
        common.fail(e)
    if args.detach:
        detach(args, state_dir)
        return
    try:
        asyncio.run(Supervisor(args, state_dir).run())
    except PhyError as e:
        common.fail(e)


def detach(args: argparse.Namespace, state_dir: Path) -> None:
    """Run ``phyllome up`` in a new session and wait until its agents answer."""
    (state_dir / "logs").mkdir(parents=True, exist_ok=True)
    argv = [a for a in sys.argv[1:] if a not in ("--detach", "-d")]
    log = open(state_dir / "logs" / "up.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", *argv], stdout=log, stderr=log,
                            stdin=subprocess.DEVNULL, start_new_session=True,
                            cwd=Path(__file__).resolve().parents[1])
    ready = state_dir / "run" / "ready"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            print(f"phyllome up exited with {proc.returncode}; see {state_dir}/logs/up.log",
                  file=sys.stderr)
            sys.exit(common.EXIT_FAILED)
        if ready.exists() and ready.read_text().strip() == str(proc.pid):
            print((state_dir / "run" / "summary").read_text(), end="")
            return
        time.sleep(0.2)
    print(f"phyllome up did not become ready in 120 s; see {state_dir}/logs/", file=sys.stderr)
    sys.exit(common.EXIT_FAILED)


def cmd_down(args: argparse.Namespace) -> None:
    state_dir = Path(args.state_dir)
    pid = running_pid(state_dir)
    if pid is None:
        print("phyllome is not running")
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except OSError:
            print("phyllome stopped")
            return
        time.sleep(0.1)
    print(f"phyllome (pid {pid}) did not stop within 60 s", file=sys.stderr)
    sys.exit(common.EXIT_FAILED)


class Child:
    """One supervised agent process."""

    def __init__(self, name: str, env: dict[str, str], log_path: Path) -> None:

        self.name, self.env, self.log_path = name, env, log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.backoff = 1.0
        self.restarts = 0

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", f"services.{self.name}"], env=self.env, stdout=log,
                stderr=log, stdin=subprocess.DEVNULL, cwd=Path(__file__).resolve().parents[1])
        self.started = time.monotonic()

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Supervisor:
    def __init__(self, args: argparse.Namespace, state_dir: Path) -> None:
        import asyncio

        self.args = args
        self.state_dir = state_dir
        self.stop = asyncio.Event()
        self.nats: NatsServer | None = None
        self.children: list[Child] = []  # the agents
        self.web: Child | None = None
        self.image_build: asyncio.subprocess.Process | None = None
        self.image_task: asyncio.Task[None] | None = None

    @property
    def processes(self) -> list[Child]:
        return self.children + ([self.web] if self.web is not None else [])

    @property
    def web_url(self) -> str:
        """Where this host's gateway answers (on loopback when it listens on every address)."""
        host, _, port = self.args.web_listen.rpartition(":")
        host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "[::]": "[::1]"}.get(host, host)
        return f"{'https' if self.args.secure else 'http'}://{host}:{port}"

    def web_env(self, env: dict[str, str]) -> dict[str, str]:
        """The gateway's environment: its listen address; with --secure its own NATS
        identity and the host's certificate for HTTPS."""
        own = {**env, "PHYLLOME_WEB_LISTEN": self.args.web_listen}
        if self.args.secure:
            own.update(security.read_env(self.secure_dir / f"{self.args.host}-{subjects.WEB}.env"))
            own.update(PHYLLOME_WEB_CERT=str(self.secure_dir / "server.pem"),
                       PHYLLOME_WEB_KEY=str(self.secure_dir / "server-key.pem"))
        return own

    async def run(self) -> None:
        import asyncio

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        for d in ("logs", "run"):
            (self.state_dir / d).mkdir(parents=True, exist_ok=True)
        pid_file(self.state_dir).write_text(str(os.getpid()))
        if self.args.secure:
            secure_marker(self.state_dir).write_text(str(os.getpid()))
            # This process (set-up, readiness checks) acts as admin; each agent as itself.
            security.generate(self.secure_dir, [self.args.host])
            os.environ.update(security.read_env(self.secure_dir / "admin.env"))
        try:
            url = await self.start_nats()
            await self.prepare_jetstream(url)
            env = {**os.environ, "PHYLLOME_NATS_URL": url, "PHYLLOME_HOST": self.args.host,
                   "PHYLLOME_STATE_DIR": str(self.state_dir),
                   "PHYLLOME_REPLICAS": str(self.replicas())}
            for name in self.args.agents.split(","):
                own = dict(env)
                if self.args.secure:
                    own.update(security.read_env(
                        self.secure_dir / f"{self.args.host}-{subjects.service(name)}.env"))
                child = Child(subjects.service(name), own,
                              self.state_dir / "logs" / f"{name}.log")
                child.start()
                self.children.append(child)
            if not self.args.no_web:
                self.web = Child(subjects.WEB, self.web_env(env),
                                 self.state_dir / "logs" / f"{subjects.WEB}.log")
                self.web.start()
            await self.wait_ready(url)
            if self.args.build_debian:
                self.image_task = asyncio.create_task(self.build_debian(url))
            await self.supervise()
        finally:
            await self.stop_image_build()
            for child in self.processes:
                child.stop()
            if self.nats is not None:
                self.nats.stop()
            for f in ("up.pid", "ready", "summary", "nats_url", "secure"):
                (self.state_dir / "run" / f).unlink(missing_ok=True)

    @property
    def secure_dir(self) -> Path:
        return self.state_dir / "secure"

    async def start_nats(self) -> str:
        from shared.bus import Bus

        url = os.environ.get("PHYLLOME_NATS_URL")
        if url:
            bus = await Bus.connect(url, name="phyllome-up", host=self.args.host,
                                           give_up_after=10, **common.credentials())
            await bus.close()
            print(f"using the NATS server at {url}", flush=True)
            return url
        host, _, port = self.args.listen.rpartition(":")
        host = host or "127.0.0.1"
        routes = parse_urls(self.args.cluster_routes, "--cluster-routes")
        cluster_listen = self.args.cluster_listen
        if routes and not cluster_listen:
            cluster_listen = f"{host}:6222"
        self.nats = NatsServer(
            self.state_dir / "nats", host=host, port=int(port or 4222), name=self.args.host,
            cluster_listen=cluster_listen, routes=routes, leaf_listen=self.args.leaf_listen,
            leaf_remotes=parse_urls(self.args.leaf_remotes, "--leaf-remotes", LEAF_URL),
            jetstream=not self.args.leaf_remotes,
            conf_file=Path(self.args.nats_config) if self.args.nats_config else None,
            extra_conf=security.server_conf(self.secure_dir) if self.args.secure else "")
        self.nats.start()
        joined = f"; cluster routes {', '.join(routes)}" if routes else ""
        print(f"nats-server {self.args.host} listening on {self.nats.url} "
              f"(data in {self.state_dir}/nats{joined})", flush=True)
        # Agents reach the server on loopback even when it listens on every address.
        return self.nats.url.replace("://0.0.0.0:", "://127.0.0.1:")

    async def prepare_jetstream(self, url: str, timeout: float = 90.0) -> None:
        """Create PHY_EVENTS and the KV buckets with this cluster's replicas, once JetStream
        answers (a forming cluster first elects its meta leader), before any agent or CLI
        could create them with other settings."""
        import asyncio

        import nats.errors

        from shared.bus import Bus

        cfg = load("hardware", {**os.environ, "PHYLLOME_HOST": self.args.host})
        bus = await Bus.connect(url, name="phyllome-up", host=self.args.host,
                                       give_up_after=10, replicas=self.replicas(),
                                       kv_ttl_s=cfg.heartbeat_ttl_s, **common.credentials())
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    await bus.ensure_stream()
                    for bucket in subjects.KV_BUCKETS:
                        await bus.kv(bucket)
                    return
                except (PhyError, TimeoutError, nats.errors.Error) as e:
                    if time.monotonic() > deadline or self.stop.is_set():
                        raise Unavailable(f"JetStream at {url} did not get ready in "
                                          f"{timeout:.0f} s ({e!r}); see "
                                          f"{self.state_dir}/nats/nats-server.log") from None
                    await asyncio.sleep(0.5)
        finally:
            await bus.close()

    def replicas(self) -> int:
        """``--replicas``, else 3 when the cluster has three or more servers, else 1."""
        if self.args.replicas is not None:
            return int(self.args.replicas)
        routes = parse_urls(self.args.cluster_routes, "--cluster-routes")
        return 3 if len(routes) >= 3 else 1

    async def wait_ready(self, url: str) -> None:
        import asyncio

        from cli.status import collect

        deadline = time.monotonic() + 90
        rows: list[dict[str, object]] = []
        while time.monotonic() < deadline and not self.stop.is_set():
            try:
                rows = [r for r in await asyncio.to_thread(collect, url, 0.5)
                        if r["host"] == self.args.host]
            except PhyError:  # a server of the cluster moved
                await asyncio.sleep(0.5)
                continue
            if {r["agent"] for r in rows if r["healthy"]} >= {c.name for c in self.children}:
                break
            await asyncio.sleep(0.1)  # status ends once the agents it knows of answer
            for child in self.processes:
                if child.proc is not None and child.proc.poll() is not None:
                    raise Unavailable(f"the {child.name} agent exited at start; see "
                                      f"{child.log_path}")
        else:
            if not self.stop.is_set():
                raise Unavailable(f"agents did not all answer within 90 s; see "
                                  f"{self.state_dir}/logs/")
        lines = [f"phyllome is up on host {self.args.host} (NATS {url})"]
        for r in sorted(rows, key=lambda r: str(r["agent"])):
            lines.append(f"  {r['agent']:<10} {r['version']:<8} metrics {r['metrics_url']}")
        if self.web is not None:
            await self.wait_web(deadline)
            lines.append(f"  {subjects.WEB:<10} {'':<8} UI and API {self.web_url}/ (a token: "
                         "phyllome web token create me --role admin)")
        lines += [
            "next:",
            "  phyllome status            the agents of every host",
            "  phyllome events --since 1h what happened",
            f"  logs in {self.state_dir}/logs/; stop with `phyllome down`",
        ]
        if self.args.secure:
            lines += [f"secure: TLS and one identity per agent; for the CLI run "
                      f"`set -a; . {self.secure_dir}/operator.env; set +a`"]
        if not self.args.no_demo:
            lines += await self.demo(url)
        if self.args.build_debian:
            lines += [f"phyllome-debian guest image: building in the background (log "
                      f"{self.image_log}); the catalogue lists it when it is ready"]
        summary = "\n".join(lines) + "\n"
        (self.state_dir / "run" / "summary").write_text(summary)
        (self.state_dir / "run" / "nats_url").write_text(url)
        (self.state_dir / "run" / "ready").write_text(str(os.getpid()))
        print(summary, end="", flush=True)

    async def wait_web(self, deadline: float) -> None:
        """Until the gateway answers its health check (it connects to NATS first)."""
        import asyncio
        import ssl

        import httpx

        verify: ssl.SSLContext | bool = ssl.create_default_context(
            cafile=str(self.secure_dir / "ca.pem")) if self.args.secure else True
        async with httpx.AsyncClient(verify=verify, timeout=2) as http:
            while time.monotonic() < deadline and not self.stop.is_set():
                try:
                    if (await http.get(f"{self.web_url}/api/v1/health")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                assert self.web is not None and self.web.proc is not None
                if self.web.proc.poll() is not None:
                    raise Unavailable(f"the web gateway exited at start; see {self.web.log_path}")
                await asyncio.sleep(0.2)
        if not self.stop.is_set():
            raise Unavailable(f"the web gateway did not answer on {self.web_url} within 90 s; "
                              f"see {self.state_dir}/logs/{subjects.WEB}.log")

    @property
    def image_log(self) -> Path:
        return self.state_dir / "logs" / "debian-image.log"

    async def build_debian(self, url: str) -> None:
        """``deploy/setup.sh debian`` in its own process group, then a catalogue refresh that
        lists (and announces) ``phyllome-debian``; a failure is logged, the stack runs on."""
        import asyncio

        from shared.bus import Bus
        from shared.messages import Empty
        from shared.messages import catalogue as catalogue_api

        repo = Path(__file__).resolve().parents[1]
        script = repo / "deploy" / "setup.sh"
        if not (repo / "deploy" / "images" / "build-debian.sh").is_file():
            print("phyllome-debian: no deploy/images/build-debian.sh here (not a checkout); "
                  "not built", flush=True)
            return
        started = time.monotonic()
        with open(self.image_log, "ab") as log:
            self.image_build = await asyncio.create_subprocess_exec(
                str(script), "debian", cwd=repo, stdout=log, stderr=log,
                stdin=subprocess.DEVNULL, start_new_session=True,
                env={**os.environ, "PHYLLOME_STATE_DIR": str(self.state_dir)})
        rc = await self.image_build.wait()
        if rc != 0:
            print(f"phyllome-debian: the build failed ({rc}); see {self.image_log}", flush=True)
            return
        bus = await Bus.connect(url, name="phyllome-up", host=self.args.host,
                                give_up_after=10, **common.credentials())
        try:
            await bus.call(self.args.host, catalogue_api.REFRESH, Empty(), timeout=60)
            # As the catalogue's auto-pull does for phyllome-tiny at start: `vm create
            # --image phyllome-debian` then works at once.
            await bus.call(self.args.host, catalogue_api.PULL,
                           catalogue_api.PullRequest(id="phyllome-debian"), timeout=60)
        except (PhyError, TimeoutError) as e:
            print(f"phyllome-debian: built, but the catalogue did not take it: {e}", flush=True)
            return
        finally:
            await bus.close()
        print(f"phyllome-debian: built in {time.monotonic() - started:.0f} s; the catalogue "
              "lists it and pulls it (phyllome images info phyllome-debian)", flush=True)

    async def stop_image_build(self) -> None:
        import asyncio
        import contextlib

        if self.image_build is not None and self.image_build.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.image_build.pid, signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.image_build.wait(), 30)
        if self.image_task is not None:
            self.image_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.image_task

    async def demo(self, url: str) -> list[str]:
        """The first ``up`` of a host with no VMs creates and starts the ``demo`` VM."""
        from shared.bus import Bus

        if not {"vm", "storage", "catalogue"} <= {c.name for c in self.children}:
            return []
        from cli.vm import ensure_demo

        bus = await Bus.connect(url, name="phyllome-up", host=self.args.host,
                                       give_up_after=10, **common.credentials())
        try:
            return await ensure_demo(bus, self.args.host)
        finally:
            await bus.close()

    async def supervise(self) -> None:
        import asyncio

        while not self.stop.is_set():
            try:
                await asyncio.wait_for(self.stop.wait(), 0.5)
            except TimeoutError:
                pass
            for child in self.processes:
                if self.stop.is_set() or child.proc is None or child.proc.poll() is None:
                    continue
                if time.monotonic() - child.started > STABLE_AFTER_S:
                    child.backoff = 1.0
                print(f"{child.name} agent exited with {child.proc.returncode}; restarting in "
                      f"{child.backoff:.0f} s", flush=True)
                try:
                    await asyncio.wait_for(self.stop.wait(), child.backoff)
                except TimeoutError:
                    child.restarts += 1
                    child.backoff = min(child.backoff * 2, RESTART_BACKOFF_MAX_S)
                    child.start()
