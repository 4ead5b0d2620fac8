"""Fifty hosts on one NATS cluster, simulated on this machine (docs/scale.md reads the rows).

Three nats-servers on loopback form one cluster (routes, JetStream R3, as deploy/nats/
cluster.conf). Each of 50 hosts runs the real hardware agent (on a fixture sysfs tree from
tests/support/sysfs_tree.py), storage agent (a pool in its state directory) and vm agent
(libvirt's test driver on a host file of its own), with the shipped heartbeat (5 s, TTL 20 s)
and R3 buckets; 20 VMs each, 1,000 in all. 49 hosts' agents run in worker processes of 10
hosts (30 agents sharing one event loop, each with its own NATS connection, micro service,
heartbeat and /metrics); the last host's three agents are three real processes
(``python -m services.<agent>``), which are measured at rest and then SIGKILLed. Measured:

- ``phyllome vm list --all`` (a CLI process) and ``cluster_vms`` across 1,000 VMs, beside
  a nats-py user's ``kv.keys()`` + ``kv.get()`` per key;
- RSS and CPU of the agents at rest, in their own processes and in the shared ones;
- event fan-out: events published to PHY_EVENTS, read by 10 subscribers as `phyllome
  events` reads (one ordered JetStream consumer each), beside core NATS to 10 subscribers;
- placement of 100 VMs (``choose`` then CREATE, as ``vm create --host auto``, one caller
  keeping a ``Recent`` and following KV ``hosts``), beside the same creates with the host
  given, and how often it read KV ``vms``;
- what the host watch costs at rest (JetStream API calls, messages, server CPU), and at
  1,000 hosts (3,000 copies of the real heartbeats): 8 followers of the bucket while every
  key is rewritten once a beat (the watch now: deliveries, CPU per delivery), beside the
  full reads it replaced (reads a second served, the consumer create + delete each made),
  and the R3 puts per second the heartbeats need;
- the time from SIGKILL of a host's agents to the first ``host.down`` event.

    python -m bench.bench_scale [--quick]     # --quick: 10 hosts x 5 VMs, shorter rests
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench.common import Result, cpu_seconds, percentile

REPO = Path(__file__).resolve().parents[1]
AGENTS = ("hardware", "storage", "vm")
HEARTBEAT_S, TTL_S = 5.0, 20.0  # the shipped defaults (shared/config.py)
PER_WORKER = 10  # hosts per worker process
FIXTURE_NAMES = ("intel-desktop", "amd-desktop", "sriov-nic", "laptop", "epyc-snp")
MiB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def rss_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


# -- the NATS cluster --------------------------------------------------------------------------


class NatsCluster:
    """Three nats-servers on loopback: one cluster, JetStream R3, a monitoring port each."""

    def __init__(self, work: Path) -> None:
        from shared.natsserver import NatsServer

        routes = [free_port() for _ in range(3)]
        self.http = [free_port() for _ in range(3)]
        urls = [f"nats://127.0.0.1:{p}" for p in routes]
        self.servers = [NatsServer(work / f"n{i}", port=-1, name=f"n{i}",
                                   cluster_listen=f"127.0.0.1:{routes[i]}", routes=urls,
                                   extra_conf=f"http: 127.0.0.1:{self.http[i]}\n")
                        for i in range(3)]

    def start(self) -> None:
        for s in self.servers:
            s.start()
        deadline = time.monotonic() + 60
        while not self.leader():
            if time.monotonic() > deadline:
                raise RuntimeError("the NATS cluster elected no JetStream leader in 60 s")
            time.sleep(0.2)

    def stop(self) -> None:
        for s in self.servers:
            s.stop()

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    def monitor(self, i: int, path: str) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http[i]}/{path}", timeout=5) as r:
            out: dict[str, Any] = json.load(r)
            return out

    def leader(self) -> str:
        try:
            meta = self.monitor(0, "jsz").get("meta_cluster", {})
        except OSError:
            return ""
        return str(meta.get("leader", "")) if meta.get("cluster_size", 0) >= 3 else ""

    def counters(self) -> dict[str, float]:
        """Totals over the three servers: JetStream API calls, messages, CPU seconds."""
        out = {"api": 0.0, "in_msgs": 0.0, "out_msgs": 0.0, "cpu_s": 0.0, "rss_mib": 0.0,
               "connections": 0.0}
        for i, s in enumerate(self.servers):
            out["api"] += self.monitor(i, "jsz").get("api", {}).get("total", 0)
            varz = self.monitor(i, "varz")
            out["in_msgs"] += varz["in_msgs"]
            out["out_msgs"] += varz["out_msgs"]
            out["connections"] += varz["connections"]
            assert s.proc is not None
            out["cpu_s"] += cpu_seconds(s.proc.pid)
            out["rss_mib"] += rss_mib(s.proc.pid)
        return out


# -- one simulated host ------------------------------------------------------------------------


def host_env(work: Path, host: str, fixture: str, nats_url: str) -> dict[str, str]:
    """Files of host ``host`` (sysfs tree, libvirt host file, config) and its agents' env."""
    from tests.support.libvirt import TEST_HOST_XML
    from tests.support.sysfs_tree import FIXTURES, build

    root = work / "hosts" / host
    tree = FIXTURES[fixture]()
    builder = build(root / "sys", tree)
    (root / "proc").mkdir(parents=True, exist_ok=True)
    (root / "libvirt-host.xml").write_text(TEST_HOST_XML)
    conf = root / "phyllome.toml"
    conf.write_text(f"heartbeat_s = {HEARTBEAT_S}\nheartbeat_ttl_s = {TTL_S}\nreplicas = 3\n"
                    f'[hardware]\nroot_dev = "{tree.root_dev}"\n'
                    f'proc_root = "{root / "proc"}"\n')
    return {"PHYLLOME_HOST": host, "PHYLLOME_NATS_URL": nats_url,
            "PHYLLOME_STATE_DIR": str(root / "state"), "PHYLLOME_CONFIG": str(conf),
            "PHYLLOME_LIBVIRT_URI": f"test://{root / 'libvirt-host.xml'}",
            "PHYLLOME_SYSFS_ROOT": str(builder.root), "PHYLLOME_ACCELERATOR": "tcg",
            "PHYLLOME_LOG_LEVEL": "WARNING",
            **{f"PHYLLOME_{a.upper()}_METRICS_PORT": "0" for a in AGENTS}}


async def worker(spec_file: str) -> None:
    """``--worker FILE``: run the agents of the hosts FILE lists in this event loop, say
    ``ready``, drain them all on SIGTERM."""
    import importlib

    from shared.agent import Agent
    from shared.config import load

    envs: list[dict[str, str]] = json.loads(Path(spec_file).read_text())
    agents: list[Agent] = []
    limit = asyncio.Semaphore(6)

    async def start(name: str, env: dict[str, str]) -> None:
        service = importlib.import_module(f"services.{name}.service")
        agent = Agent(name, load(name, env=env))
        async with limit:
            await agent.start(service.setup, service.ENDPOINTS)
        agents.append(agent)

    await asyncio.gather(*(start(a, env) for env in envs for a in AGENTS))
    print("ready", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await asyncio.gather(*(a.drain() for a in agents), return_exceptions=True)


class Workers:
    """The worker processes and the one host whose agents are processes of their own."""

    def __init__(self, work: Path, envs: list[dict[str, str]]) -> None:
        self.work = work
        self.envs = envs
        self.workers: list[subprocess.Popen[bytes]] = []
        self.own: dict[str, subprocess.Popen[bytes]] = {}  # agent -> process, last host

    async def start(self) -> None:
        shared_hosts, last = self.envs[:-1], self.envs[-1]
        base = {k: v for k, v in os.environ.items() if not k.startswith("PHYLLOME_")}
        base["PYTHONPATH"] = str(REPO)
        for n in range(0, len(shared_hosts), PER_WORKER):
            spec = self.work / f"worker-{n // PER_WORKER}.json"
            spec.write_text(json.dumps(shared_hosts[n:n + PER_WORKER]))
            with open(self.work / f"worker-{n // PER_WORKER}.log", "wb") as log:
                self.workers.append(subprocess.Popen(
                    [sys.executable, "-m", "bench.bench_scale", "--worker", str(spec)],
                    cwd=REPO, env=base, stdout=subprocess.PIPE, stderr=log,
                    start_new_session=True))
        for name in AGENTS:
            with open(self.work / f"own-{name}.log", "wb") as log:
                self.own[name] = subprocess.Popen(
                    [sys.executable, "-m", f"services.{name}"], cwd=REPO,
                    env={**base, **last}, stdout=log, stderr=log, start_new_session=True)
        for i, proc in enumerate(self.workers):
            line = await asyncio.to_thread(proc.stdout.readline)  # type: ignore[union-attr]
            if line.strip() != b"ready":
                log_text = (self.work / f"worker-{i}.log").read_text(errors="replace")
                raise RuntimeError(f"worker {i} did not start: {log_text[-3000:]}")

    def kill_own(self) -> None:
        for proc in self.own.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def stop(self) -> None:
        self.kill_own()
        for proc in self.workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.workers:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# -- the measures ------------------------------------------------------------------------------


async def wait_hosts_up(bus: Any, hosts: list[str], timeout: float = 120.0) -> float:
    from shared.cluster import host_views_on

    started = time.monotonic()
    while True:
        views = {v.host: v for v in await host_views_on(bus)}
        ready = [h for h in hosts if h in views and views[h].state == "up"
                 and set(AGENTS) <= set(views[h].agents) and views[h].resources is not None
                 and views[h].pools]
        if len(ready) == len(hosts):
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            missing = sorted(set(hosts) - set(ready))
            raise RuntimeError(f"hosts not up with all agents after {timeout:g} s: {missing}")
        await asyncio.sleep(1.0)


RETRIES = {"n": 0}  # requests retried after an Unavailable (a JetStream busy or electing)


async def retried(fn: Callable[[], Awaitable[Any]], tries: int = 4) -> Any:
    """``fn()``, again after an Unavailable, as a user retries what the error tells them to
    retry; each retry is counted and reported."""
    from shared.errors import Unavailable

    for attempt in range(tries):
        try:
            return await fn()
        except Unavailable:
            if attempt == tries - 1:
                raise
            RETRIES["n"] += 1
            await asyncio.sleep(1.0)


def vm_spec(name: str) -> Any:
    from shared.messages.vm import VmSpec

    return VmSpec(name=name, memory_mib=64, vcpus=1, firmware="bios", display="none", nics=[])


async def create_vms(bus: Any, hosts: list[str], per_host: int) -> float:
    from shared.messages import vm as vm_api
    from shared.messages.vm import VmCreate

    limit = asyncio.Semaphore(16)

    async def one(host: str, i: int) -> None:
        async with limit:
            await retried(functools.partial(
                bus.call, host, vm_api.CREATE, VmCreate(spec=vm_spec(f"{host}-vm{i:02d}")),
                timeout=120))

    t = time.perf_counter()
    await asyncio.gather(*(one(h, i) for h in hosts for i in range(per_host)))
    return time.perf_counter() - t


async def at_rest(bus: Any, cluster: NatsCluster, workers: Workers,
                  seconds: float) -> dict[str, Any]:
    """RSS and CPU of every agent process and server over ``seconds`` of rest."""
    pids = {f"own-{n}": p.pid for n, p in workers.own.items()}
    pids.update({f"worker-{i}": p.pid for i, p in enumerate(workers.workers)})
    before_cpu = {k: cpu_seconds(p) for k, p in pids.items()}
    from shared import subjects

    before = cluster.counters()
    stream = (await bus.js.stream_info(subjects.STREAM)).state
    t0 = time.monotonic()
    await asyncio.sleep(seconds)
    dt = time.monotonic() - t0
    after = cluster.counters()
    stream_after = (await bus.js.stream_info(subjects.STREAM)).state
    out: dict[str, Any] = {"dt": dt, "cpu_pct": {}, "rss": {},
                           "events_per_s": (stream_after.messages - stream.messages) / dt,
                           "event_bytes": stream_after.bytes / max(stream_after.messages, 1),
                           "connections": after["connections"],
                           "subscriptions": cluster.monitor(0, "subsz")["num_subscriptions"]}
    for k, pid in pids.items():
        out["cpu_pct"][k] = (cpu_seconds(pid) - before_cpu[k]) / dt * 100
        out["rss"][k] = rss_mib(pid)
    for k in ("api", "in_msgs", "out_msgs", "cpu_s"):
        out[f"{k}_per_s"] = (after[k] - before[k]) / dt
    out["nats_rss_mib"] = after["rss_mib"]
    out["watchers"] = sorted(value.decode() for _k, _r, value in
                             await bus.kv_entries(subjects.KV_WATCHERS))
    return out


async def vm_list(bus: Any, url: str, expected: int, rounds: int) -> dict[str, float]:
    import nats.js.errors

    from bench.bench_cluster_list import best_of, naive
    from shared.cluster import cluster_vms

    peer_retries = 0

    async def peer() -> int:
        """nats-py's ``kv.keys()`` (a watcher) sometimes answers "no keys", or too few, on a
        loaded machine: such a round is run again, and counted."""
        nonlocal peer_retries
        for _ in range(5):
            try:
                if (n := await naive(bus)) == expected:
                    return n
            except nats.js.errors.NoKeysError:
                pass
            peer_retries += 1
        raise RuntimeError(f"kv.keys() + kv.get() did not see the {expected} VMs in 5 tries")

    seen = len(await cluster_vms(bus))
    if seen != expected:
        raise RuntimeError(f"cluster_vms sees {seen} VMs, not {expected}")
    await peer()
    ours = await best_of(rounds, lambda: cluster_vms(bus))
    theirs = await best_of(max(3, rounds // 3), peer)
    env = {**os.environ, "PHYLLOME_NATS_URL": url, "PYTHONPATH": str(REPO)}
    walls = []
    for _ in range(3):
        t = time.perf_counter()
        done = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "cli.main", "vm", "list", "--all", "--json"],
            cwd=REPO, env=env, capture_output=True)
        walls.append(time.perf_counter() - t)
        if done.returncode != 0:
            raise RuntimeError(f"vm list failed: {done.stderr.decode()[-2000:]}")
        listed = len(json.loads(done.stdout)["vms"])
        assert listed == expected, f"`vm list --all` listed {listed} VMs, not {expected}"
    helps = []
    for _ in range(3):
        t = time.perf_counter()
        await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "cli.main", "--help"],
                                cwd=REPO, env=env, capture_output=True, check=True)
        helps.append(time.perf_counter() - t)
    return {"cluster_vms": ours, "naive": theirs, "cli": statistics.median(walls),
            "help": statistics.median(helps), "peer_retries": peer_retries}


async def fan_out(cluster: NatsCluster, count: int, background: float,
                  readers: int = 10) -> dict[str, float]:
    """``count`` events published at once into PHY_EVENTS, read by ``readers`` ordered
    consumers (as `phyllome events` reads); then 200 more at 100 a second, for the latency
    of a cluster not flooded; then ``count`` plain messages to ``readers`` core subscribers."""
    import nats

    from shared import subjects
    from shared.bus import Bus
    from shared.codec import decode
    from shared.messages import AgentStarted

    paced = 200
    urls = cluster.urls
    subject = subjects.event("bench", "vm", "bench.fanout")
    pub = await Bus.connect(urls[0], name="bench-pub", host="bench", give_up_after=10,
                            replicas=3)
    subs = [await Bus.connect(urls[i % len(urls)], name=f"bench-sub{i}", host="bench",
                              give_up_after=10, replicas=3) for i in range(readers)]
    lat: dict[str, list[float]] = {"burst": [], "paced": []}
    got = {"burst": [0] * readers, "paced": [0] * readers}
    wanted = {"burst": count, "paced": paced}
    done = {"burst": asyncio.Event(), "paced": asyncio.Event()}
    first_seen = [asyncio.Event() for _ in range(readers)]

    def event(phase: str, i: int) -> AgentStarted:
        return AgentStarted(host="bench", agent="vm", version="1", metrics_url="",
                            event_id=f"{phase}-{since}-{i}")

    try:
        since = time.time()

        async def read(i: int) -> None:
            async for _subj, _ts, data in subs[i].events(subject, since=since, follow=True):
                now = time.time()
                ev = decode(data, AgentStarted)
                phase = ev.event_id.split("-", 1)[0]
                if phase == "warm":
                    first_seen[i].set()
                    continue
                lat[phase].append(now - ev.time)
                got[phase][i] += 1
                if all(g >= wanted[phase] for g in got[phase]):
                    done[phase].set()

        tasks = [asyncio.create_task(read(i)) for i in range(readers)]
        await pub.publish_event(subject, event("warm", 0))
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in first_seen)), 30)
        t, cpu, servers = time.perf_counter(), time.process_time(), cluster.counters()["cpu_s"]
        for n in range(0, count, 100):
            await pub.publish_events([(subject, event("burst", i))
                                      for i in range(n, min(count, n + 100))])
        published = time.perf_counter() - t
        await asyncio.wait_for(done["burst"].wait(), 120)
        ours = time.perf_counter() - t
        client_cpu = time.process_time() - cpu
        server_cpu = max(cluster.counters()["cpu_s"] - servers - background * ours, 0.0)
        for i in range(paced):
            await pub.publish_event(subject, event("paced", i))
            await asyncio.sleep(0.01)
        await asyncio.wait_for(done["paced"].wait(), 60)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for b in (pub, *subs):
            await b.close()
    # core NATS: the same count of the same payload to ``readers`` plain subscribers
    payload = b"x" * 200
    ncs = [await nats.connect(urls[i % len(urls)]) for i in range(readers + 1)]
    try:
        core_got = [0] * readers
        core_done = asyncio.Event()

        def counter(i: int) -> Any:
            async def cb(_msg: Any) -> None:
                core_got[i] += 1
                if all(g >= count for g in core_got):
                    core_done.set()
            return cb

        for i in range(readers):
            await ncs[i + 1].subscribe("bench.core.fanout", cb=counter(i))
            await ncs[i + 1].flush()
        await asyncio.sleep(0.5)  # the interest reached every server
        t = time.perf_counter()
        for _ in range(count):
            await ncs[0].publish("bench.core.fanout", payload)
        await ncs[0].flush()
        await asyncio.wait_for(core_done.wait(), 60)
        core = time.perf_counter() - t
    finally:
        for nc in ncs:
            await nc.close()
    return {"ours_s": ours, "core_s": core, "client_cpu_s": client_cpu,
            "published_s": published,
            "server_cpu_s": server_cpu,
            "burst_p50_ms": percentile(lat["burst"], 50) * 1000,
            "p50_ms": percentile(lat["paced"], 50) * 1000,
            "p99_ms": percentile(lat["paced"], 99) * 1000}


async def placement(bus: Any, count: int) -> dict[str, Any]:
    """``count`` VMs placed as ``vm create --host auto`` does, then as many with the host
    given (the creates alone): the difference is what placement costs. One caller placing
    them all keeps a ``Recent`` (what it placed since each host's last beats) and follows KV
    ``hosts`` (no read of it per choice); the reads of KV ``vms`` it makes are counted (none
    while every vm agent's beat has the figure)."""
    from shared import subjects
    from shared.cluster import HeartbeatFollower
    from shared.messages import vm as vm_api
    from shared.messages.vm import VmCreate
    from shared.placement import Recent, choose

    vms_reads = {"n": 0}
    read_entries = bus.kv_entries

    async def counted(bucket: str) -> Any:  # the reads of KV vms choose makes, and only those
        vms_reads["n"] += bucket == subjects.KV_VMS
        return await read_entries(bucket)

    bus.kv_entries = counted
    follower = HeartbeatFollower(bus)
    await follower.start()
    chosen: dict[str, int] = {}
    choose_s: list[float] = []
    recent = Recent()
    t = time.perf_counter()
    for i in range(count):
        spec = vm_spec(f"placed-{i:03d}")
        c0 = time.perf_counter()
        choice = await retried(functools.partial(choose, bus, spec, recent=recent,
                                                 follower=follower))
        choose_s.append(time.perf_counter() - c0)
        chosen[choice.host] = chosen.get(choice.host, 0) + 1
        await retried(functools.partial(bus.call, choice.host, vm_api.CREATE,
                                        VmCreate(spec=spec), timeout=60))
    placed = time.perf_counter() - t
    bus.kv_entries = read_entries
    await follower.stop()
    order = sorted(chosen)
    t = time.perf_counter()
    for i in range(count):
        await retried(functools.partial(bus.call, order[i % len(order)], vm_api.CREATE,
                                        VmCreate(spec=vm_spec(f"given-{i:03d}")), timeout=60))
    given = time.perf_counter() - t
    plain = []  # a choice that reads KV hosts (vm create --host auto, a process of its own)
    for i in range(10):
        t = time.perf_counter()
        await retried(functools.partial(choose, bus, vm_spec(f"plain-{i}")))
        plain.append(time.perf_counter() - t)
    # where a choice's time goes: each read it makes, alone, median of 5; KV vms, which it
    # no longer reads, for scale
    from shared.cluster import hosts_ttl

    parts: dict[str, Callable[[], Awaitable[Any]]] = {
        "KV hosts (when not followed)": lambda: bus._read_bucket(subjects.KV_HOSTS),
        "TTL": lambda: hosts_ttl(bus),
        "(KV vms, not read:": lambda: bus._read_bucket(subjects.KV_VMS)}
    profile = {}
    for what, fn in parts.items():
        times = []
        for _ in range(5):
            t = time.perf_counter()
            await retried(fn)
            times.append(time.perf_counter() - t)
        profile[what] = statistics.median(times) * 1000
    vms = len(await bus.kv_entries(subjects.KV_VMS))
    return {"placed_s": placed, "profile": profile, "vms": vms, "given_s": given,
            "hosts": len(chosen), "count": count, "vms_reads": vms_reads["n"],
            "plain_p50_ms": percentile(plain, 50) * 1000,
            "most": max(chosen.values()), "choose_p50_ms": percentile(choose_s, 50) * 1000,
            "choose_p99_ms": percentile(choose_s, 99) * 1000}


async def watch_capacity(bus: Any, cluster: NatsCluster, sizes: tuple[int, ...],
                         seconds: float, background: float) -> dict[int, dict[str, float]]:
    """The host watch at each of ``sizes`` hosts: every hardware agent reads all of KV
    ``hosts`` (3 keys a host) once a beat. A scratch bucket of that size holding copies of
    the real heartbeats: what one full read costs (wall and the reader's CPU over serial
    reads), how many reads a second 8 readers at once get, against the rate that many
    watchers need, and the servers' CPU per read in that phase (above their ``background``
    CPU/s at rest); R3 puts a second while filling it; at the largest size the consumer
    churn the reads make."""
    from shared import subjects

    beats = [value for _key, _rev, value in await bus.kv_entries(subjects.KV_HOSTS)]
    return {hosts: await probe(bus, cluster, hosts, beats, background, seconds,
                               churn=hosts == max(sizes)) for hosts in sizes}


async def probe(bus: Any, cluster: NatsCluster, hosts: int, beats: list[bytes],
                background: float, seconds: float, *, churn: bool) -> dict[str, float]:
    """One size of ``watch_capacity``."""
    from shared import subjects

    bucket = f"scale_probe_{hosts}"
    kv = await bus.js.create_key_value(bucket=bucket, history=1, replicas=3, ttl=3600)
    limit = asyncio.Semaphore(64)

    async def put(i: int, key: str) -> None:
        async with limit:
            await kv.put(key, beats[i % len(beats)])  # the real heartbeats, their sizes

    t = time.perf_counter()
    await asyncio.gather(*(put(h, subjects.heartbeat_key(f"h{h:04d}", a))
                           for h in range(hosts) for a in AGENTS))
    res = {"puts_per_s": hosts * len(AGENTS) / (time.perf_counter() - t),
           "puts_needed": hosts * len(AGENTS) / HEARTBEAT_S,
           "needed_per_s": hosts / HEARTBEAT_S,
           "beat_bytes": sum(map(len, beats)) / len(beats)}
    try:
        walls, client = [], []
        for _ in range(5):
            t, c = time.perf_counter(), time.process_time()
            entries = await bus._read_bucket(bucket)
            walls.append(time.perf_counter() - t)
            client.append(time.process_time() - c)
            assert len(entries) == hosts * len(AGENTS)
        res["read_ms"] = statistics.median(walls) * 1000
        res["client_cpu_ms"] = statistics.median(client) * 1000
        reads = 0
        end = time.monotonic() + seconds

        from shared.errors import Unavailable

        refused = 0

        async def reader() -> None:
            """Reads as fast as the cluster serves them; one it refuses (503 while eight
            readers' consumers come and go) is counted, not served."""
            nonlocal reads, refused
            while time.monotonic() < end:
                try:
                    await bus._read_bucket(bucket)
                    reads += 1
                except Unavailable:
                    refused += 1

        before, t = cluster.counters()["cpu_s"], time.perf_counter()
        await asyncio.gather(*(reader() for _ in range(8)))
        took = time.perf_counter() - t
        spent = cluster.counters()["cpu_s"] - before - background * took  # less the hosts' own
        res["reads_per_s"] = reads / took
        res["refused"] = refused
        res["server_cpu_ms"] = max(spent, 0.0) / reads * 1000
        if churn:
            res["churn_per_s"] = await consumer_churn(bus, bucket, seconds)
            res |= await follow(bus, cluster, bucket, hosts, beats, seconds, background)
    finally:
        await bus.js.delete_key_value(bucket)
    return res


async def follow(bus: Any, cluster: NatsCluster, bucket: str, hosts: int, beats: list[bytes],
                 seconds: float, background: float, followers: int = 8) -> dict[str, float]:
    """The host watch as it is now: ``followers`` long-lived consumers of the bucket (one
    pull consumer each, polled once a beat, as ``HeartbeatFollower``) while every key is
    rewritten once a beat (3 keys a host / 5 s): the deliveries each follower gets against
    the writes, and the CPU a delivery costs the servers and the follower (in the first
    pass, every key to every follower; and the steady phase less the writes alone)."""
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    from shared import subjects

    keys = [subjects.heartbeat_key(f"h{h:04d}", a) for h in range(hosts) for a in AGENTS]
    rate = len(keys) / HEARTBEAT_S
    kv = await bus.js.key_value(bucket)
    limit = asyncio.Semaphore(64)

    last: dict[str, int] = {}  # the revision of each key's last write

    async def put(i: int) -> None:
        async with limit:
            key = keys[i % len(keys)]
            rev = await kv.put(key, beats[i % len(beats)])
            last[key] = max(last.get(key, 0), rev)

    async def writes() -> tuple[float, float, float]:
        """Puts at ``rate`` for ``seconds``: (seconds, servers' CPU s, this process's CPU s)."""
        cpu0, c0, t0 = cluster.counters()["cpu_s"], time.process_time(), time.perf_counter()
        tasks = []
        for i in range(int(rate * seconds)):
            due = t0 + i / rate
            if (wait := due - time.perf_counter()) > 0:
                await asyncio.sleep(wait)
            tasks.append(asyncio.create_task(put(i)))
        await asyncio.gather(*tasks)
        return (time.perf_counter() - t0, cluster.counters()["cpu_s"] - cpu0,
                time.process_time() - c0)

    n_writes = int(rate * seconds)
    alone_s, alone_srv, alone_cli = await writes()
    subs: list[Any] = []

    held: list[dict[str, int]] = [{} for _ in range(followers)]  # what each follower has

    async def poll(sub: Any) -> int:
        """What the watch does each beat: take everything written since, in batches."""
        n, mine = 0, held[subs.index(sub)]
        while pending := (await sub.consumer_info()).num_pending:
            for msg in await sub.fetch(min(pending, 1000), timeout=30):
                key = msg.subject.removeprefix(f"$KV.{bucket}.")
                mine[key] = max(mine.get(key, 0), msg.metadata.sequence.stream)
                n += 1
        return n

    written = asyncio.Event()

    async def polling(sub: Any) -> int:
        """A poll a beat while the writes go on, and one after the last write."""
        n = 0
        while not written.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(written.wait(), HEARTBEAT_S)
            n += await poll(sub)
        return n

    t, cpu0, c0 = time.perf_counter(), cluster.counters()["cpu_s"], time.process_time()
    try:
        for _ in range(followers):
            subs.append(await bus.js.pull_subscribe(
                f"$KV.{bucket}.>", stream=f"KV_{bucket}", config=ConsumerConfig(
                    deliver_policy=DeliverPolicy.LAST_PER_SUBJECT, ack_policy=AckPolicy.NONE,
                    inactive_threshold=120.0)))
        first = await asyncio.gather(*(poll(sub) for sub in subs))
        assert all(n == len(keys) for n in first), first
        first_pass = time.perf_counter() - t
        first_srv = cluster.counters()["cpu_s"] - cpu0 - background * first_pass
        first_cli = time.process_time() - c0
        readers = [asyncio.create_task(polling(sub)) for sub in subs]
        with_s, with_srv, with_cli = await writes()
        written.set()
        delivered = sum(await asyncio.gather(*readers))
        current = sum(all(mine.get(k) == rev for k, rev in last.items()) for mine in held)
    finally:
        for sub in subs:
            with contextlib.suppress(Exception):
                await bus.js.delete_consumer(f"KV_{bucket}", (await sub.consumer_info()).name)
                await sub.unsubscribe()
    per_s = delivered / followers / with_s
    # per delivery: the first pass (every key to every follower at once) says it above the
    # noise of 50 hosts at rest; the steady phase less the writes alone, for comparison
    server_cost = max(first_srv, 0.0) / (followers * len(keys))
    client_cost = first_cli / (followers * len(keys))
    steady_cost = max(with_srv / with_s - alone_srv / alone_s, 0.0) / (delivered / with_s)
    return {"follow_per_s": per_s, "follow_needed": rate, "follow_puts_per_s": n_writes / with_s,
            "follow_first_ms": first_pass * 1000,
            "follow_server_us": server_cost * 1e6, "follow_client_us": client_cost * 1e6,
            "follow_steady_us": steady_cost * 1e6,
            "followers": float(followers), "current": float(current)}


async def consumer_churn(bus: Any, bucket: str, seconds: float) -> float:
    """What each read of the host watch asks of JetStream's meta group: an ephemeral
    consumer created, then deleted. Pairs a second, 8 at once, for ``seconds``."""
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    pairs = 0
    end = time.monotonic() + seconds

    async def churn() -> None:
        nonlocal pairs
        while time.monotonic() < end:
            info = await bus.js.add_consumer(f"KV_{bucket}", ConsumerConfig(
                deliver_policy=DeliverPolicy.LAST_PER_SUBJECT, ack_policy=AckPolicy.NONE,
                filter_subject=f"$KV.{bucket}.>", inactive_threshold=60.0))
            await bus.js.delete_consumer(f"KV_{bucket}", info.name)
            pairs += 1

    t = time.perf_counter()
    await asyncio.gather(*(churn() for _ in range(8)))
    return pairs / (time.perf_counter() - t)


async def host_down(urls: list[str], workers: Workers, victim: str) -> dict[str, float]:
    """SIGKILL the victim's three agent processes; seconds until the first ``host.down``
    event about it reaches a core subscriber, how many watchers published it, and how many
    the stream kept."""
    import nats

    from shared import subjects
    from shared.bus import Bus

    nc = await nats.connect(urls[1])
    arrivals: list[float] = []
    subject = f"phy.evt.*.hardware.host.down.{victim}"

    async def cb(_msg: Any) -> None:
        arrivals.append(time.monotonic())

    await nc.subscribe(subject, cb=cb)
    await nc.flush()
    bus = await Bus.connect(urls[2], name="bench-down", host="bench", give_up_after=10,
                            replicas=3)
    try:
        since = time.time()
        killed = time.monotonic()
        workers.kill_own()
        deadline = killed + TTL_S + 4 * HEARTBEAT_S + 30
        while not arrivals and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if not arrivals:
            raise RuntimeError(f"no host.down for {victim} in {deadline - killed:.0f} s")
        await asyncio.sleep(2 * HEARTBEAT_S)  # the other watchers' copies
        stored = 0
        async for subj, _ts, _data in bus.events(subjects.events_filter(kind="host.down.>"),
                                                 since=since - 1):
            stored += subj.endswith(f".{victim}")
    finally:
        await bus.close()
        await nc.close()
    return {"first_s": arrivals[0] - killed, "published": float(len(arrivals)),
            "stored": float(stored)}


# -- the run -----------------------------------------------------------------------------------


async def run(quick: bool = False) -> list[Result]:
    from shared.bus import Bus

    n_hosts, per_host = (10, 5) if quick else (50, 20)
    rest_s, events = (10.0, 500) if quick else (30.0, 2000)
    work = Path(tempfile.mkdtemp(prefix="phyllome-bench-scale-", dir="/var/tmp"))
    cluster = NatsCluster(work)
    cluster.start()
    hosts = [f"h{i:02d}" for i in range(n_hosts)]
    envs = [host_env(work, h, FIXTURE_NAMES[i % len(FIXTURE_NAMES)],
                     cluster.urls[i % 3]) for i, h in enumerate(hosts)]
    workers = Workers(work, envs)
    bus = None
    try:
        t = time.perf_counter()
        await workers.start()
        bus = await Bus.connect(cluster.urls[0], name="bench", host="bench", give_up_after=10,
                                replicas=3)
        await wait_hosts_up(bus, hosts)
        up_s = time.perf_counter() - t
        created_s = await create_vms(bus, hosts, per_host)
        total = n_hosts * per_host
        rest = await at_rest(bus, cluster, workers, rest_s)
        listed = await vm_list(bus, cluster.urls[1], total, 3 if quick else 10)
        fan = await fan_out(cluster, events, rest["cpu_s_per_s"])
        placed = await placement(bus, 20 if quick else 100)
        watches = await watch_capacity(bus, cluster, (n_hosts, 1000), 5.0 if quick else 10.0,
                                       rest["cpu_s_per_s"])
        watch, small = watches[1000], watches[n_hosts]
        down = await host_down(cluster.urls, workers, hosts[-1])
    finally:
        if bus is not None:
            await bus.close()
        workers.stop()
        cluster.stop()
        subprocess.run(["rm", "-rf", str(work)], check=False)
    load = os.getloadavg()[0]
    retries = f"; {RETRIES['n']} requests retried after Unavailable" if RETRIES["n"] else ""
    shape = f"{n_hosts} hosts x {per_host} VMs, 3 servers R3"
    note_load = f"load {load:.1f}; up in {up_s:.0f} s, {total:,} creates in {created_s:.0f} s"
    in_proc = n_hosts - 1
    per_agent_rss = sum(v for k, v in rest["rss"].items() if k.startswith("worker")) / (
        in_proc * len(AGENTS))
    per_agent_cpu = sum(v for k, v in rest["cpu_pct"].items() if k.startswith("worker")) / (
        in_proc * len(AGENTS))
    rows = [
        Result("scale: vm list", f"`phyllome vm list --all --json`, {total:,} VMs, "
               f"{shape}, median of 3", listed["cli"] * 1000, listed["help"] * 1000,
               "the CLI's start-up alone: its --help", "ms", "< 1,000 ms",
               note=note_load + retries),
        Result("scale: vm list", f"cluster_vms in process, {total:,} VMs, {n_hosts} hosts",
               listed["cluster_vms"] * 1000, listed["naive"] * 1000,
               "kv.keys() + kv.get() per key", "ms", "< 1,000 ms",
               note="best of rounds" + (f"; the peer's kv.keys() ran again "
                                        f"{listed['peer_retries']:.0f} times (no keys, or "
                                        "too few, under load)" if listed["peer_retries"]
                                        else "")),
    ]
    for name in AGENTS:
        rows.append(Result(
            "scale: agent at rest", f"{name} agent, own process: RSS", rest["rss"][f"own-{name}"],
            100.0, "goal", "MiB", "< 100 MiB",
            note=f"CPU {rest['cpu_pct'][f'own-{name}']:.2f}% of a core over "
                 f"{rest['dt']:.0f} s; {n_hosts} hosts beating"))
    own_cpu = sum(rest["cpu_pct"][f"own-{n}"] for n in AGENTS)
    rows += [
        Result("scale: agent at rest", "3 agents of a host, own processes: CPU", own_cpu, 1.0,
               "goal", "% of a core", "< 1% of a core",
               note=f"heartbeat {HEARTBEAT_S:g} s; the host watch's leases held by "
                    f"{', '.join(rest['watchers'])} ("
                    + ("this host among them: it follows " f"{n_hosts * 3} keys)"
                       if hosts[-1] in rest["watchers"] else "not this host: it watches none)")),
        Result("scale: agent at rest", f"in a shared process ({PER_WORKER * 3} agents): "
               "RSS per agent", per_agent_rss, 100.0, "goal", "MiB", "< 100 MiB",
               note=f"CPU {per_agent_cpu:.2f}% of a core per agent"),
        Result("scale: NATS cluster at rest", f"{shape}: 3 servers' CPU",
               rest["cpu_s_per_s"] * 100, 10.0, "goal", "% of a core", "< 10% of a core",
               note=f"JetStream API {rest['api_per_s']:.1f} calls/s, msgs in "
                    f"{rest['in_msgs_per_s']:.0f}/s, out {rest['out_msgs_per_s']:.0f}/s; "
                    f"RSS {rest['nats_rss_mib']:.0f} MiB; {rest['connections']:.0f} "
                    f"connections, {rest['subscriptions']:,} subscriptions on a server; "
                    f"{rest['events_per_s']:.2f} events/s stored, "
                    f"{rest['event_bytes']:.0f} bytes each"),
        Result("scale: event fan-out", f"{events:,} events to 10 readers (JetStream "
               "ordered consumers)", events * 10 / fan["ours_s"], events * 10 / fan["core_s"],
               "core NATS, 10 subscribers", "deliveries/s", ">= 10,000/s",
               higher_is_better=True,
               note=f"at 100 events/s: latency p50 {fan['p50_ms']:.1f} ms, p99 "
                    f"{fan['p99_ms']:.1f} ms; in the burst p50 {fan['burst_p50_ms']:.0f} ms, "
                    f"CPU of the burst: readers' process {fan['client_cpu_s']:.1f} s, "
                    f"servers {fan['server_cpu_s']:.1f} s over rest in {fan['ours_s']:.1f} s; "
                    f"all stored (R3) after {fan['published_s']:.1f} s"),
        Result("scale: placement", f"{placed['count']} VMs, "
               "choose + create over the bus", placed["placed_s"], placed["given_s"],
               "the same creates, host given", "s", "< 10 s",
               note=f"choose p50 {placed['choose_p50_ms']:.0f} ms, p99 "
                    f"{placed['choose_p99_ms']:.0f} ms (reading KV hosts instead of following "
                    f"it: p50 {placed['plain_p50_ms']:.0f} ms); spread over "
                    f"{placed['hosts']} hosts, at most {placed['most']} on one; KV vms read "
                    f"{placed['vms_reads']} times; its reads alone: "
                    + ", ".join(f"{k} {v:.0f} ms" for k, v in placed["profile"].items())
                    + f" with {placed['vms']:,} VMs)"),
        Result("scale: host watch at 1,000 hosts", "following a 3,000-key KV hosts rewritten "
               f"once a beat, {watch['followers']:.0f} followers polled once a beat (the watch "
               "now)", watch["follow_per_s"], watch["follow_needed"],
               "a full read of every key once a beat, as before", "messages/s per follower",
               "every key's last write, no consumer made per beat",
               note=f"writes at {watch['follow_puts_per_s']:.0f}/s; after the last poll "
                    f"{watch['current']:.0f} of {watch['followers']:.0f} followers held the "
                    "last write of every key (a history-1 bucket keeps one message a key: a "
                    "write superseded before the poll is not sent); a message costs "
                    f"{watch['follow_server_us']:.1f} us of the servers' CPU and "
                    f"{watch['follow_client_us']:.0f} us of the follower's (in the first pass, "
                    f"8 x 3,000 keys in {watch['follow_first_ms']:.0f} ms)"),
        Result("scale: host watch at 1,000 hosts", "full reads of a 3,000-key KV hosts, "
               "8 readers (the watch before: one a beat)", watch["reads_per_s"],
               watch["needed_per_s"],
               "needed: 1,000 watchers / 5 s beat", "reads/s", ">= 1.0x needed",
               higher_is_better=True,
               note=f"one read {watch['read_ms']:.0f} ms: {watch['client_cpu_ms']:.0f} ms CPU "
                    f"in the reader, {watch['server_cpu_ms']:.0f} ms in the servers (over rest); "
                    f"at "
                    f"{n_hosts} hosts {small['read_ms']:.0f} ms: {small['client_cpu_ms']:.0f} "
                    f"+ {small['server_cpu_ms']:.0f} ms"
                    + (f"; {watch['refused']:.0f} reads refused (503), not counted"
                       if watch["refused"] else "")),
        Result("scale: host watch at 1,000 hosts", "consumer create + delete (each read "
               "makes one), 8 at once", watch["churn_per_s"], watch["needed_per_s"],
               "needed: 1,000 watchers / 5 s beat", "pairs/s", ">= 1.0x needed",
               higher_is_better=True, note="through the JetStream meta group (R3)"),
        Result("scale: heartbeats at 1,000 hosts", "R3 KV puts the cluster takes "
               "(64 in flight)", watch["puts_per_s"], watch["puts_needed"],
               "needed: 3,000 agents / 5 s beat", "puts/s", ">= 1.0x needed",
               higher_is_better=True, note=f"heartbeats of {watch['beat_bytes']:.0f} bytes "
                                           "on average (the real ones, copied)"),
        Result("scale: host down", "SIGKILL of a host's agents -> first host.down",
               down["first_s"], TTL_S + 2 * HEARTBEAT_S, "goal: TTL + 2 beats", "s",
               f"<= {TTL_S + 2 * HEARTBEAT_S:g} s",
               note=f"published by {down['published']:.0f} watchers, "
                    f"{down['stored']:.0f} kept in PHY_EVENTS; TTL {TTL_S:g} s"),
    ]
    return rows


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        import logging

        logging.basicConfig(level=logging.WARNING)
        asyncio.run(worker(sys.argv[2]))
    else:
        for r in asyncio.run(run("--quick" in sys.argv)):
            print(r.row())
