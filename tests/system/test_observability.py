"""Observability end to end: the stack, a real Prometheus on deploy/'s config, every
dashboard panel and rule evaluated, an alert when an agent dies.

The stack is `phyllome up` as a user runs it (the vm agent on libvirt's test driver), with a
loopback HTTP image source. The test makes the stack do what fills the dashboards -- a VM
created and started, a volume imported, cloned and sent to a host whose storage agent stops
mid-transfer (a transfer failure), an image pulled, a source that is down, a refused device
bind, a kernel uevent -- and then asks Prometheus's HTTP API:

- every agent's /metrics passes ``promtool check metrics``;
- every Grafana panel query returns at least one series (a panel showing "No data" fails);
- every recording rule returns series; every alert rule evaluates, and each series it
  watches exists (so no alert watches a misspelled or vanished metric);
- the transfer-failure and image-source alerts fire, and killing an agent fires
  PhyllomeAgentDown.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared import contracts
from shared.bus import Bus
from shared.errors import NotFound
from shared.jobs import wait_job
from shared.messages import Empty
from shared.messages import catalogue as catalogue_api
from shared.messages import hardware as hardware_api
from shared.messages import storage as storage_api
from shared.messages import vm as vm_api
from shared.messages.catalogue import ListRequest, PullRequest
from shared.messages.hardware import BindRequest, DeviceList, DeviceQuery
from shared.messages.storage import CloneVolume, ImportVolume, ListVolumes, SendVolume
from shared.messages.vm import Disk, VmCreate, VmListRequest, VmRef, VmSpec
from tests.support.agents import agent_in_process
from tests.support.httpserver import FileServer
from tests.support.prometheus import Prometheus, panel_queries, running_prometheus
from tests.support.require import require, require_binary
from tests.support.tiny import TinyImage
from tests.support.wait import until

pytestmark = pytest.mark.system

REPO = Path(__file__).resolve().parents[2]
HOST = "obshost"
VM_NAME = f"phy-obs-{os.getpid()}"
AGENTS = ("hardware", "vm", "storage", "catalogue")
MiB = 1 << 20


def phyllome(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=150)


def image_source(root: Path) -> None:
    """A manifest with one good image (1 MiB of data, sha256) and one whose URL is gone."""
    root.mkdir()
    data = os.urandom(MiB)
    (root / "lab-tiny.raw").write_bytes(data)
    (root / "images.json").write_text(json.dumps({"images": [
        {"id": "lab-tiny", "name": "Lab tiny", "arch": "x86_64", "url": "lab-tiny.raw",
         "format": "raw", "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)},
        {"id": "lab-gone", "name": "Lab gone", "arch": "x86_64", "url": "gone.raw",
         "format": "raw"}]}))


def config(path: Path, source_url: str) -> None:
    path.write_text(f"""
[catalogue]
osinfo_dir = ""
auto_pull = []
probe_interval_s = 1
sources = [{{name = "lab", kind = "manifest", url = "{source_url}images.json"}},
           {{name = "gone", kind = "manifest", url = "{source_url}missing.json"}}]

[storage]
chunk_timeout_s = 1
resume_timeout_s = 2
""")


async def exercise(nats_url: str, state: Path, guest: Path) -> None:
    """What fills the dashboards; each step is something a user does."""
    bus = await Bus.connect(nats_url, name="observability-test", host=HOST, give_up_after=10)
    try:
        devices: DeviceList = await bus.call(HOST, hardware_api.LIST, DeviceQuery())
        await bus.call(HOST, hardware_api.CAPS, Empty())
        # a refused bind is counted; an address no machine has, so nothing is ever bound
        with pytest.raises(NotFound):
            await bus.call(HOST, hardware_api.BIND, BindRequest(address="0000:fe:1f.7"))
        # a real kernel uevent (FACTS.md: it arrives within 0.3 s)
        assert devices.devices, "no PCI device in the inventory"
        Path("/sys/bus/pci/devices", devices.devices[0].address, "uevent").write_text("change")

        # a real phyllome-tiny guest under the host's libvirtd (TCG), so the VM panels show
        # a VM that really runs: CPU, memory, disk and network series from QEMU
        disk = guest / "vm-disk.raw"
        with open(disk, "wb") as f:
            f.truncate(16 * MiB)
        disk.chmod(0o644)
        spec = VmSpec(name=VM_NAME, memory_mib=256, vcpus=1, firmware="bios", display="vnc",
                      kernel=str(guest / "vmlinuz"), initrd=str(guest / "initrd.gz"),
                      cmdline="console=ttyS0 phyllome.stay=1", disks=[Disk(path=str(disk))])
        await bus.call(HOST, vm_api.CREATE, VmCreate(spec=spec))
        await bus.call(HOST, vm_api.START, VmRef(vm=VM_NAME), timeout=60)

        seed = state / "import" / "seed.raw"
        seed.parent.mkdir(exist_ok=True)
        seed.write_bytes(os.urandom(2 * MiB))
        await bus.call(HOST, storage_api.IMPORT_FILE, ImportVolume(name="seed",
                                                                    source=str(seed)))
        await _until(bus, "storage", "volumes", ListVolumes(), lambda r: any(
            v.name == "seed" for v in r.volumes))
        await bus.call(HOST, storage_api.CLONE, CloneVolume(name="seed", dst_name="copy"))
        # a transfer that fails: the receiving host's storage agent goes away mid-transfer
        # (the send is slowed down so that it still runs then), and the sender gives up
        # after resume_timeout_s
        async with agent_in_process("storage", nats_url, state.parent / "ghost",
                                    "ghost") as ghost:
            sent = await bus.call(HOST, storage_api.SEND, SendVolume(
                name="seed", to_host="ghost", bwlimit_bytes_s=256 * 1024))
            await until("the transfer to ghost under way",
                        lambda: ghost.handlers.receiver.incoming, timeout=20)
        outcome = await wait_job(bus, HOST, "storage", sent, timeout=60)
        assert (outcome.state, outcome.error_kind) == ("failed", "unavailable"), outcome

        await bus.call(HOST, catalogue_api.PULL, PullRequest(id="lab-tiny"))

        # Steady traffic, as clients of a real cluster make: a rate needs a counter to grow
        # between two scrapes (1 s apart), and each endpoint's counter is born with its
        # first call.
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            await bus.call(HOST, hardware_api.LIST, DeviceQuery())
            await bus.call(HOST, vm_api.LIST, VmListRequest())
            await bus.call(HOST, storage_api.POOLS, Empty())
            await bus.call(HOST, catalogue_api.LIST, ListRequest())
            await asyncio.sleep(0.2)
    finally:
        await bus.close()


async def _until(bus: Bus, svc: str, verb: str, req: Any, check: Any,
                 timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check(await bus.call(HOST, contracts.spec(svc, verb), req)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{svc}.{verb} did not show what the test waits for")
        await asyncio.sleep(0.2)


def watched(expr: str) -> list[str]:
    """Selectors an expression reads: metric names, recording rules, name regexes."""
    names = set(re.findall(r"\b(?:phyllome_[a-z0-9_]*[a-z0-9]|phyllome:[a-z0-9_:]+|up)\b(?!\()",
                           expr))
    return sorted(names | {f'{{__name__=~"{r}"}}' for r in re.findall(r'__name__=~"([^"]+)"',
                                                                     expr)})


def empty_or_nan(prom: Prometheus, expr: str) -> str:
    """Why ``expr`` would show "No data" (or NaN) in Grafana; "" when it has values."""
    result = prom.query(expr)
    if not result:
        return "no series"
    if all(math.isnan(float(r["value"][1])) for r in result):
        return "only NaN"
    return ""


def agent_pid(state: Path, agent: str) -> int:
    """The pid of ``python -m services.<agent>`` that `phyllome up` started for ``state``."""
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"services.{agent}".encode() in cmdline and \
                f"PHYLLOME_STATE_DIR={state}".encode() in environ:
            return int(proc.name)
    raise LookupError(f"no {agent} agent process of {state}")


def firing(prom: Prometheus, alertname: str, **labels: str) -> list[dict[str, Any]]:
    return [a for a in prom.alerts() if a["state"] == "firing"
            and a["labels"]["alertname"] == alertname
            and all(a["labels"].get(k) == v for k, v in labels.items())]


@pytest.mark.timeout(300)
def test_dashboards_rules_and_alerts_against_a_real_prometheus(
        tmp_path: Path, tiny_image: TinyImage, guest_dir: Path, libvirtd: str) -> None:
    promtool = require_binary("promtool")
    require(os.geteuid() == 0, "root, to make the kernel emit a PCI uevent")
    state = tmp_path / "state"
    for src in (tiny_image.kernel, tiny_image.initrd):
        shutil.copyfile(src, guest_dir / ("vmlinuz" if src == tiny_image.kernel
                                          else "initrd.gz"))
    image_source(tmp_path / "www")
    with FileServer(tmp_path / "www") as www:
        config(tmp_path / "phyllome.toml", www.url())
        env = {**os.environ, "PHYLLOME_STATE_DIR": str(state), "PHYLLOME_HOST": HOST,
               "PHYLLOME_CONFIG": str(tmp_path / "phyllome.toml"),
               "PHYLLOME_ACCELERATOR": "tcg",
               **{f"PHYLLOME_{a.upper()}_METRICS_PORT": "0" for a in AGENTS}}
        env.pop("PHYLLOME_NATS_URL", None)
        up = phyllome("up", "--detach", "--no-demo", "--listen", "127.0.0.1:-1", env=env)
        assert up.returncode == 0, up.stdout + up.stderr
        try:
            env["PHYLLOME_NATS_URL"] = (state / "run" / "nats_url").read_text()
            status = phyllome("status", "--json", env=env)
            assert status.returncode == 0, status.stderr
            urls = {r["agent"]: r["metrics_url"] for r in json.loads(status.stdout)
                    if r["host"] == HOST}
            assert set(urls) == set(AGENTS)
            check_exposition(promtool, urls)
            targets = [{"targets": [httpx.URL(u).netloc.decode()],
                        "labels": {"agent": a, "host": HOST}} for a, u in urls.items()]
            with running_prometheus(tmp_path / "prometheus", targets) as prom:
                prom.wait_for(lambda: len(prom.query('up{job="phyllome"} == 1')) == 4,
                              "all four agents scraped")
                asyncio.run(exercise(env["PHYLLOME_NATS_URL"], state, guest_dir))
                check_panels_and_rules(prom)
                check_alerts(prom, state)
        finally:
            gone = phyllome("vm", "delete", VM_NAME, "--force", "--host", HOST, env=env)
            down = phyllome("down", env=env)
            assert gone.returncode == 0, gone.stdout + gone.stderr
            assert down.returncode == 0, down.stdout + down.stderr


def check_exposition(promtool: str, urls: dict[str, str]) -> None:
    for agent, url in urls.items():
        body = httpx.get(url).content
        done = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True,
                              timeout=30)
        assert (done.returncode, done.stdout + done.stderr) == (0, b""), agent
        assert f"phyllome_{agent}_build_info".encode() in body


def check_panels_and_rules(prom: Prometheus) -> None:
    queries = panel_queries()
    rules = prom.rules()
    recorded = [r for r in rules if r["type"] == "recording"]
    assert len(recorded) == 6 and len(rules) > 15

    def missing() -> list[str]:
        out = [f"{board} / {title}: {why}: {expr}" for board, title, expr in queries
               if (why := empty_or_nan(prom, expr))]
        out += [f"recording rule {r['name']}: {why}" for r in recorded
                if (why := empty_or_nan(prom, r["query"]))]
        return out

    # Series appear as the stack's jobs finish and scrapes and rule evaluations follow.
    try:
        prom.wait_for(lambda: not missing(), "data for every panel and recording rule", 60)
    except TimeoutError:
        gaps = missing()
        assert not gaps, "panels or rules without data:\n" + "\n".join(gaps)
    for rule in rules:
        assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))
        if rule["type"] == "alerting":
            absent = [s for s in watched(rule["query"]) if not prom.query(f"count({s})")]
            assert absent == [], f"alert {rule['name']} watches series that do not exist"


def check_alerts(prom: Prometheus, state: Path) -> None:
    # conditions the stack really has: a transfer whose receiver went away, a source whose
    # index is missing
    prom.wait_for(lambda: firing(prom, "PhyllomeTransferFailures", host=HOST,
                                 direction="send"), "PhyllomeTransferFailures firing")
    prom.wait_for(lambda: firing(prom, "PhyllomeImageSourceDown", host=HOST, source="gone"),
                  "PhyllomeImageSourceDown firing")
    assert not firing(prom, "PhyllomeAgentDown")
    assert not firing(prom, "PhyllomeBusDisconnected")

    # An agent dies. `phyllome up` restarts it, but on a new port (metrics port 0 here), so
    # this target stays down as a dead agent's would.
    os.kill(agent_pid(state, "storage"), signal.SIGKILL)
    alert = prom.wait_for(lambda: firing(prom, "PhyllomeAgentDown", agent="storage",
                                         host=HOST), "PhyllomeAgentDown firing")
    assert alert[0]["labels"]["severity"] == "critical"
    assert "storage agent of obshost" in alert[0]["annotations"]["summary"]
    assert [a for a in firing(prom, "PhyllomeAgentDown") if a["labels"]["agent"] != "storage"] \
        == []
