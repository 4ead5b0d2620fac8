"""Three hosts as network namespaces, one NATS cluster with JetStream R3, real agents.

Hosts a and b run ``phyllome up --cluster-routes ...``, host c ``phyllome up --nats-config``
with deploy/nats/cluster.conf; each nats-server joins the cluster, and each host's hardware,
storage and vm agents heartbeat into KV ``hosts``; the vm agents use libvirt's test driver.
Then: ``phyllome hosts`` shows three hosts up; 1,000 VMs across them list from KV (in about
30 ms: bench/bench_cluster_list.py); host c dies (nats-server and agents SIGKILLed) and the
other two keep serving, show c down with one ``host.down`` event, its VMs ``unknown``, and
events flow.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.netns import REPO, SUBNET, Cluster, Hosts

pytestmark = pytest.mark.cluster

NAMES = ("a", "b", "c")
HEARTBEAT_S, TTL_S = 1.0, 6.0
VMS_PER_HOST = 334  # 1,002 in all


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    workdir = tmp_path_factory.mktemp("cluster")
    # Host c runs the operator's config from deploy/nats, with this test's addresses.
    conf = (REPO / "deploy" / "nats" / "cluster.conf").read_text()
    for i in (1, 2, 3):
        conf = conf.replace(f"10.0.0.{i}:", f"{SUBNET}.{i}:")
    conf = conf.replace("/var/lib/phyllome/nats", str(workdir / "c" / "nats"))
    (workdir / "c").mkdir()
    (workdir / "c" / "cluster.conf").write_text(conf)
    with Hosts(workdir / "ns", NAMES) as hosts:
        c = Cluster(hosts, workdir, heartbeat_s=HEARTBEAT_S, ttl_s=TTL_S,
                    nats_config={"c": workdir / "c" / "cluster.conf"})
        c.wait_up()
        yield c


def test_three_hosts_one_cluster_with_r3(cluster: Cluster) -> None:
    deadline = time.monotonic() + 30
    while True:  # resources land in the heartbeat on the agents' first cluster round
        views = cluster.hosts_json("b")
        if set(views) == set(NAMES) and all(
                v["state"] == "up" and v["resources"] and v["pools"] for v in views.values()):
            break
        assert time.monotonic() < deadline, views
        time.sleep(0.5)
    for v in views.values():
        assert v["agents"] == ["hardware", "storage", "vm"]
        assert v["resources"]["cpus"] >= 1 and v["resources"]["memory_available_bytes"] > 0
        assert v["pools"]["default"]["free_bytes"] > 0
    table = cluster.cli("a", "hosts")
    assert table.returncode == 0, table.stderr
    assert [line.split()[:2] for line in table.stdout.splitlines()[1:]] == [
        [n, "up"] for n in NAMES]
    replicas = cluster.py("c", """
async def main(bus):
    out = {}
    for name in ("PHY_EVENTS", "KV_hosts", "KV_vms"):
        info = await bus.js.stream_info(name)
        out[name] = [info.config.num_replicas, len(info.cluster.replicas or []) + 1]
    return out
""")
    assert replicas == {s: [3, 3] for s in ("PHY_EVENTS", "KV_hosts", "KV_vms")}
    choice = cluster.py("a", """
from shared.errors import InsufficientResources
from shared.messages.vm import VmSpec
from shared.placement import choose
async def main(bus):
    fits = await choose(bus, VmSpec(name="p", memory_mib=64, firmware="bios"))
    try:
        await choose(bus, VmSpec(name="p", memory_mib=1 << 30))
    except InsufficientResources as e:
        return [fits.host, fits.reason, e.message]
""")
    assert choice[0] in NAMES and choice[1].startswith(f"{choice[0]}: up, ")
    assert "no host can take this VM" in choice[2] and "a: " in choice[2]


def test_thousand_vms_listed_from_kv(cluster: Cluster) -> None:
    created = cluster.py("a", f"""
from shared.messages import vm as vm_api
from shared.messages.vm import VmCreate, VmSpec
async def main(bus):
    sem = asyncio.Semaphore(24)
    async def one(host, i):
        async with sem:
            spec = VmSpec(name=f"vm-{{host}}-{{i:04d}}", memory_mib=64, vcpus=1,
                          firmware="bios", display="none", nics=[])
            await bus.call(host, vm_api.CREATE, VmCreate(spec=spec), timeout=60)
    await asyncio.gather(*(one(h, i) for h in {list(NAMES)!r}
                           for i in range({VMS_PER_HOST})))
    return {VMS_PER_HOST} * {len(NAMES)}
""", timeout=300)
    assert created == VMS_PER_HOST * len(NAMES)
    listed = cluster.py("b", """
from shared.cluster import cluster_vms
async def main(bus):
    best = 99.0
    for _ in range(3):
        t = time.perf_counter()
        records = await cluster_vms(bus)
        best = min(best, time.perf_counter() - t)
    return {"n": len(records), "s": best, "hosts": sorted({r.host for r in records}),
            "states": sorted({r.state for r in records})}
""")
    assert listed["n"] == VMS_PER_HOST * len(NAMES) and listed["hosts"] == list(NAMES)
    assert listed["states"] == ["shutoff"]
    assert listed["s"] < 10, listed  # about 30 ms (bench/bench_cluster_list.py)
    started = time.perf_counter()
    cli = cluster.cli("c", "vm", "list", "--all", "--json")
    wall = time.perf_counter() - started
    assert cli.returncode == 0, cli.stderr
    assert len(json.loads(cli.stdout)["vms"]) == VMS_PER_HOST * len(NAMES)
    print(f"cluster_vms: {listed['s'] * 1000:.0f} ms; `phyllome vm list --all`: {wall:.2f} s")


def test_host_down_cluster_keeps_serving(cluster: Cluster) -> None:
    # This test's own VMs, one per host, so that it needs no other test to have run first.
    for name in NAMES:
        made = cluster.cli("a", "vm", "create", f"own-{name}", "--host", name, "--memory",
                           "64M", "--firmware", "bios", "--display", "none", "--json")
        assert made.returncode == 0, made.stdout + made.stderr
    deadline = time.monotonic() + 30
    while not {f"own-{n}" for n in NAMES} <= set(cluster.py("b", """
from shared.cluster import cluster_vms
async def main(bus):
    return [r.spec.name for r in await cluster_vms(bus)]
""")):
        assert time.monotonic() < deadline, "the VMs are not all in KV vms"
        time.sleep(0.5)
    views = cluster.hosts_json("a")
    assert [views[n]["state"] for n in NAMES] == ["up", "up", "up"], views
    before = time.time()
    cluster.hosts["c"].kill_all()
    killed = time.monotonic()
    deadline = killed + TTL_S + 30
    while cluster.hosts_json("a")["c"]["state"] != "down":
        assert time.monotonic() < deadline, "host c is not shown down"
        time.sleep(0.5)
    print(f"host c shown down {time.monotonic() - killed:.1f} s after it died")
    views = cluster.hosts_json("b")
    assert [views[n]["state"] for n in NAMES] == ["up", "up", "down"]
    assert cluster.cli("a", "hosts").returncode == 1  # a host is down: say so in the exit code

    def host_events(kind: str) -> list[dict[str, Any]]:
        out = cluster.cli("b", "events", "--json", "--subject", f"phy.evt.*.*.{kind}.c")
        assert out.returncode == 0, out.stderr
        return [json.loads(line)["event"] for line in out.stdout.splitlines() if line]

    deadline = time.monotonic() + TTL_S + 20
    while not (downs := host_events("host.down")):
        assert time.monotonic() < deadline, "no host.down event for c"
        time.sleep(0.5)
    time.sleep(3 * HEARTBEAT_S)  # give the other watcher its chance to publish a duplicate
    downs = host_events("host.down")
    assert len(downs) == 1, downs
    assert downs[0]["down_host"] == "c" and downs[0]["host"] in ("a", "b")
    assert downs[0]["last_beat"] <= before + 1

    # The cluster still serves (two of three servers): KV, requests and events.
    vms = cluster.py("a", """
from shared.cluster import cluster_vms
from shared.messages import vm as vm_api
async def main(bus):
    return [[r.host, r.state, r.reason] for r in await cluster_vms(bus)]
""")
    assert {(h, s) for h, s, _ in vms} == {("a", "shutoff"), ("b", "shutoff"), ("c", "unknown")}
    assert next(r for h, _, r in vms if h == "c") == "host c is down"
    new = cluster.cli("a", "vm", "create", "after-c", "--host", "b", "--memory", "64M",
                      "--firmware", "bios", "--json")
    assert new.returncode == 0, new.stdout + new.stderr
    events = cluster.cli("a", "events", "--json", "--subject", "phy.evt.b.vm.>",
                         "--since", "1m")
    assert any(json.loads(line)["event"].get("name") == "after-c"
               for line in events.stdout.splitlines()), events.stdout[-2000:]
