"""The hardware agent on a real nats-server over fixture trees: endpoints, jobs, events, KV."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest

from services.hardware.handlers import Handlers
from shared import subjects
from shared.agent import Agent
from shared.contracts import event_decoder
from shared.errors import Conflict, Forbidden, InvalidMessage, InvalidName, NotFound
from shared.messages import Empty
from shared.messages import hardware as hardware_api
from shared.messages.hardware import (
    BindRequest,
    BootProbe,
    DeviceAdded,
    DeviceChanged,
    DeviceQuery,
    DeviceRef,
    DeviceRemoved,
    MdevCreate,
    MdevRef,
    SriovSet,
)
from shared.messages.hosts import Heartbeat
from shared.messages.jobs import JobStatus
from tests.support.agents import REPO, agent_in_process
from tests.support.sysfs_tree import FIXTURES, Pci, TreeBuilder, TreeKernel, build
from tests.support.wait import until

pytestmark = pytest.mark.integration


@asynccontextmanager
async def hw_agent(url: str, tmp_path: Path, fixture: str = "intel-desktop", **settings: Any
                   ) -> AsyncIterator[tuple[Agent, Handlers, TreeBuilder]]:
    host = FIXTURES[fixture]()
    builder = build(tmp_path / "sys", host)
    (tmp_path / "proc").mkdir()
    async with agent_in_process(
            "hardware", url, tmp_path / "state", "h1", sysfs_root=str(builder.root),
            extra={"root_dev": host.root_dev, "proc_root": str(tmp_path / "proc"),
                   **settings}) as agent:
        handlers: Handlers = agent.handlers
        handlers.fs.after_write = TreeKernel(builder)  # the kernel's part on a tree
        yield agent, handlers, builder


@asynccontextmanager
async def events(agent: Agent, kind: str = ">") -> AsyncIterator[asyncio.Queue[Any]]:
    """Events of the hardware agent of h1, decoded, as they are published."""
    queue: asyncio.Queue[Any] = asyncio.Queue()

    async def on(msg: Any) -> None:
        queue.put_nowait(event_decoder().decode(msg.data))

    sub = await agent.bus.nc.subscribe(subjects.events_filter("h1", "hardware", kind), cb=on)
    try:
        yield queue
    finally:
        await sub.unsubscribe()


async def job_done(agent: Agent, job_id: str) -> JobStatus:
    return await asyncio.wait_for(agent.jobs.wait(job_id), 30)


async def test_reads_over_the_bus(nats_server, tmp_path: Path) -> None:
    async with hw_agent(nats_server.url, tmp_path) as (agent, _h, _b):
        bus = agent.bus
        gpus = await bus.call("h1", hardware_api.LIST, DeviceQuery(kind="gpu"))
        assert [d.address for d in gpus.devices] == ["0000:00:02.0", "0000:01:00.0"]
        dev = await bus.call("h1", hardware_api.DEVICE, DeviceRef(address="01:00.0"))
        assert dev.passthrough.verdict == "with-companions" and dev.vendor == "NVIDIA Corporation"
        groups = await bus.call("h1", hardware_api.GROUPS, Empty())
        assert groups.iommu and [g.id for g in groups.groups] == [0, 1, 2, 3, 4, 5]
        caps = await bus.call("h1", hardware_api.CAPS, Empty())
        assert (caps.cpu_vendor, caps.virt_extension, caps.nested) == ("intel", "vmx", True)
        assert caps.kvm_ioctl == "not-run" and caps.kvm_usable is False
        report = await bus.call("h1", hardware_api.REPORT, Empty())
        assert len(report.devices) == 15 and len(report.gpus) == 2
        with pytest.raises(NotFound, match="no PCI device 0000:07:00.0"):
            await bus.call("h1", hardware_api.DEVICE, DeviceRef(address="0000:07:00.0"))
        with pytest.raises(InvalidName, match="not a PCI address"):
            await bus.call("h1", hardware_api.DEVICE, DeviceRef(address="gpu0"))
        with pytest.raises(InvalidMessage):
            await bus.request(subjects.command("h1", "hardware", "list"), {"kind": "toaster"},
                              Empty)


async def test_caps_in_the_heartbeat_and_the_boot_probe_decides(
        nats_server, tmp_path: Path) -> None:
    async with hw_agent(nats_server.url, tmp_path) as (agent, _h, _b):
        kv = await agent.bus.kv(subjects.KV_HOSTS)

        async def heartbeat() -> Heartbeat:
            return msgspec.json.decode((await kv.get("h1.hardware")).value or b"",
                                       type=Heartbeat)

        hb = await heartbeat()
        assert hb.details.caps is not None
        assert hb.details.caps.kvm_usable is False and hb.details.caps.iommu is True
        caps = await agent.bus.call("h1", hardware_api.BOOT_PROBE,
                                    BootProbe(result="passed", detail="tiny guest ready"))
        assert caps.kvm_boot_probe == "passed" and caps.kvm_usable is True
        caps_now = (await heartbeat()).details.caps
        assert caps_now is not None and caps_now.kvm_usable is True
        caps = await agent.bus.call("h1", hardware_api.BOOT_PROBE, BootProbe(result="failed"))
        assert caps.kvm_usable is False


async def test_bind_and_release_jobs_with_events(nats_server, tmp_path: Path) -> None:
    async with hw_agent(nats_server.url, tmp_path) as (agent, _h, _b), \
            events(agent, "device.changed") as changed:
        bus = agent.bus
        accepted = await bus.call("h1", hardware_api.BIND, BindRequest(address="0000:01:00.0"))
        st = await job_done(agent, accepted.job_id)
        assert st.state == "succeeded", st.message
        assert st.result["devices"] == ["0000:01:00.0", "0000:01:00.1", "0000:01:00.2",
                                        "0000:01:00.3"]
        seen = [await asyncio.wait_for(changed.get(), 5) for _ in range(4)]
        assert all(isinstance(e, DeviceChanged) and e.device.driver == "vfio-pci" for e in seen)
        dev = await bus.call("h1", hardware_api.DEVICE, DeviceRef(address="0000:01:00.1"))
        assert dev.driver == "vfio-pci"
        accepted = await bus.call("h1", hardware_api.RELEASE, DeviceRef(address="01:00.1"))
        st = await job_done(agent, accepted.job_id)
        assert st.state == "succeeded", st.message
        assert st.result["drivers"] == {"0000:01:00.0": "nvidia", "0000:01:00.1": "snd_hda_intel",
                                        "0000:01:00.2": "xhci_hcd", "0000:01:00.3": "nvidia-gpu"}
        with pytest.raises(Forbidden, match="boot GPU"):
            await bus.call("h1", hardware_api.BIND, BindRequest(address="0000:00:02.0"))
        with pytest.raises(Conflict, match="not bound to vfio-pci"):
            await bus.call("h1", hardware_api.RELEASE, DeviceRef(address="0000:01:00.0"))


async def test_two_binds_of_one_group_at_once(nats_server, tmp_path: Path) -> None:
    async with hw_agent(nats_server.url, tmp_path) as (agent, handlers, _b):
        gate = asyncio.Event()
        bind = handlers.ops.bind

        async def held(*args: Any, **kw: Any) -> dict[str, object]:
            await gate.wait()  # keep the first job inside its claim
            return await bind(*args, **kw)

        handlers.ops.bind = held  # type: ignore[method-assign]
        results = await asyncio.gather(
            agent.bus.call("h1", hardware_api.BIND, BindRequest(address="0000:01:00.0")),
            agent.bus.call("h1", hardware_api.BIND, BindRequest(address="0000:01:00.1")),
            return_exceptions=True)
        won = [r for r in results if not isinstance(r, BaseException)]
        lost = [r for r in results if isinstance(r, BaseException)]
        assert len(won) == 1 and len(lost) == 1
        assert isinstance(lost[0], Conflict)
        assert "IOMMU group 1 is busy (bind of 0000:01:00." in lost[0].message
        gate.set()
        st = await job_done(agent, won[0].job_id)
        assert st.state == "succeeded", st.message
        again = await agent.bus.call("h1", hardware_api.RELEASE,
                                     DeviceRef(address="0000:01:00.0"))
        assert (await job_done(agent, again.job_id)).state == "succeeded"


async def test_failed_bind_job_reports_the_rollback(nats_server, tmp_path: Path) -> None:
    async with hw_agent(nats_server.url, tmp_path) as (agent, handlers, builder):
        handlers.fs.after_write = TreeKernel(builder, {"bus/pci/drivers_probe": 2})
        accepted = await agent.bus.call("h1", hardware_api.BIND,
                                        BindRequest(address="0000:01:00.0"))
        st = await job_done(agent, accepted.job_id)
        assert st.state == "failed" and st.error_kind == "backend"
        assert "failed at 'probe 0000:01:00.1'" in st.message and "rolled back" in st.message
        dev = await agent.bus.call("h1", hardware_api.DEVICE, DeviceRef(address="0000:01:00.0"))
        assert dev.driver == "nvidia"


async def test_a_bind_the_driver_blocks_fails_and_the_agent_keeps_serving(
        nats_server, tmp_path: Path) -> None:
    """An unbind that never returns (a FIFO with no reader) must not stop the agent."""
    async with hw_agent(nats_server.url, tmp_path, sysfs_write_timeout_s=6) as (
            agent, handlers, builder):
        fifo = builder.root / "bus/pci/drivers/nvidia/unbind"
        fifo.unlink()
        os.mkfifo(fifo)
        kv = await agent.bus.kv(subjects.KV_HOSTS)

        async def beats_after(revision: int) -> int:
            async def advanced() -> int:
                entry = await kv.get("h1.hardware")
                return entry.revision if (entry.revision or 0) > revision else 0
            return await until("the heartbeat to advance", advanced, timeout=30)

        started = time.monotonic()
        accepted = await agent.bus.call("h1", hardware_api.BIND,
                                        BindRequest(address="0000:01:00.0"))
        await beats_after((await kv.get("h1.hardware")).revision or 0)
        dev = await agent.bus.call("h1", hardware_api.DEVICE, DeviceRef(address="00:02.0"))
        assert dev.driver == "i915"
        assert agent.jobs.get(accepted.job_id).state == "running"  # all that while stuck
        st = await job_done(agent, accepted.job_id)
        assert 6 <= time.monotonic() - started < 60
        assert st.state == "failed" and st.error_kind == "backend"
        assert f"writing '0000:01:00.0' to {fifo} did not return within 6 s" in st.message
        assert "dmesg" in st.message and "could NOT undo: 0000:01:00.0" in st.message
        # the thread is still in the kernel: the agent beats, says so, refuses the device
        await beats_after((await kv.get("h1.hardware")).revision or 0)
        hb = msgspec.json.decode((await kv.get("h1.hardware")).value or b"", type=Heartbeat)
        assert hb.details.stuck_writes["0000:01:00.0"].path == str(fifo)
        with pytest.raises(Conflict, match="stuck in the kernel"):
            await agent.bus.call("h1", hardware_api.BIND, BindRequest(address="0000:01:00.0"))
        assert await asyncio.to_thread(fifo.read_text) == "0000:01:00.0"
        await until("the stuck write to return", lambda: not handlers.fs.stuck, timeout=30)


async def test_bind_refused_while_a_vm_holds_the_group(nats_server, tmp_path: Path) -> None:
    async with hw_agent(nats_server.url, tmp_path) as (agent, _h, _b):
        accepted = await agent.bus.call("h1", hardware_api.BIND,
                                        BindRequest(address="0000:01:00.0"))
        assert (await job_done(agent, accepted.job_id)).state == "succeeded"
        fd = tmp_path / "proc/999/fd"
        fd.mkdir(parents=True)
        (fd / "30").symlink_to("/dev/vfio/1")
        (tmp_path / "proc/999/cmdline").write_bytes(b"qemu-system-x86_64\0-name\0guest=gamer\0")
        with pytest.raises(Conflict, match=r"pid 999 \(VM gamer\)"):
            await agent.bus.call("h1", hardware_api.RELEASE, DeviceRef(address="0000:01:00.3"))


async def test_mdev_and_sriov_over_the_bus(nats_server, tmp_path: Path) -> None:
    async with hw_agent(nats_server.url, tmp_path, "intel-gvtg") as (agent, _h, _b):
        info = await agent.bus.call("h1", hardware_api.MDEV_CREATE, MdevCreate(
            address="0000:00:02.0", mdev_type="i915-GVTg_V5_8"))
        ack = await agent.bus.call("h1", hardware_api.MDEV_REMOVE, MdevRef(uuid=info.uuid))
        assert info.uuid in ack.message
    async with hw_agent(nats_server.url, tmp_path / "b", "sriov-nic") as (agent, _h, _b), \
            events(agent, "device.*") as seen:
        pf = await agent.bus.call("h1", hardware_api.SRIOV_SET,
                                  SriovSet(address="0000:03:00.0", num_vfs=3))
        assert len(pf.virtfns) == 3
        got = [await asyncio.wait_for(seen.get(), 5) for _ in range(6)]
        assert sum(isinstance(e, DeviceRemoved) for e in got) == 2  # the two old VFs
        assert sum(isinstance(e, DeviceAdded) for e in got) == 3


async def test_uevents_update_one_device_and_publish(nats_server, tmp_path: Path) -> None:
    async with hw_agent(nats_server.url, tmp_path) as (agent, handlers, builder), \
            events(agent, "device.*") as seen:
        builder.unbind("0000:01:00.1")
        await handlers.device_event("unbind", "0000:01:00.1")
        # ~2 ms (bench/bench_hw_uevent.py); the 5 s wait only catches an event that never comes
        ev = await asyncio.wait_for(seen.get(), 5)
        assert isinstance(ev, DeviceChanged) and ev.device.address == "0000:01:00.1"
        assert ev.device.driver == "" and ev.action == "unbind"
        builder.add(Pci(addr="0000:06:00.0", vendor=0x8086, device=0x2723, cls=0x028000,
                        driver="iwlwifi", group=9))
        await handlers.device_event("add", "0000:06:00.0")
        ev = await asyncio.wait_for(seen.get(), 5)
        assert isinstance(ev, DeviceAdded) and ev.device.name.startswith("Wi-Fi 6 AX200")
        builder.remove("0000:06:00.0")
        await handlers.device_event("remove", "0000:06:00.0")
        ev = await asyncio.wait_for(seen.get(), 5)
        assert isinstance(ev, DeviceRemoved) and ev.address == "0000:06:00.0"
        listed = await agent.bus.call("h1", hardware_api.LIST, DeviceQuery(kind="net"))
        assert [d.address for d in listed.devices] == ["0000:00:1f.6"]


async def phyllome(agent: Agent, *argv: str) -> tuple[int, str, str]:
    """The real CLI as a process, against this agent's NATS."""
    env = {**os.environ, "PHYLLOME_HOST": "h1", "PHYLLOME_NATS_URL": agent.cfg.nats_url,
           "COLUMNS": "200", "PHYLLOME_CONNECT_WAIT": "1"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli.main", "hw", *argv, cwd=REPO, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_cli_through_the_agent(nats_server, tmp_path: Path) -> None:
    async with hw_agent(nats_server.url, tmp_path) as (agent, _h, _b):
        rc, out, err = await phyllome(agent, "list", "--class", "gpu", "--json")
        assert rc == 0, err
        assert [d["address"] for d in json.loads(out)["devices"]] == ["0000:00:02.0",
                                                                      "0000:01:00.0"]
        rc, out, err = await phyllome(agent, "groups")
        assert rc == 0, err
        assert "0000:01:00.0, 0000:01:00.1" in out
        rc, out, err = await phyllome(agent, "caps", "--json")
        assert rc == 0 and json.loads(out)["kvm_usable"] is False
        rc, out, err = await phyllome(agent, "bind", "0000:01:00.0", "--json")
        assert rc == 0, err
        assert json.loads(out)["state"] == "succeeded"
        rc, out, err = await phyllome(agent, "release", "01:00.2")
        assert rc == 0 and "release: done" in out, err
        rc, out, err = await phyllome(agent, "bind", "0000:00:14.0")
        assert rc == 1 and "pass --force" in err
        rc, out, err = await phyllome(agent, "bind", "14.0")
        assert rc == 1 and "not a PCI address" in err
    rc, out, err = await phyllome(agent, "list")
    assert rc == 3  # the agent (and its NATS connection) is gone


async def test_hw_report_comes_from_the_hosts_agent_else_from_a_scan_here(
        nats_server, tmp_path: Path) -> None:
    """`hw report` asks the host's hardware agent (its live inventory: here the fixture
    tree it watches); `--local`, or no agent answering, scans this machine's /sys here; the
    report of another host comes from its agent or not at all."""
    real = sorted(os.listdir("/sys/bus/pci/devices"))
    async with hw_agent(nats_server.url, tmp_path) as (agent, _h, builder):
        rc, out, err = await phyllome(agent, "report", "--json")
        assert rc == 0, err
        tree = sorted(os.listdir(builder.root / "bus/pci/devices"))
        assert [d["address"] for d in json.loads(out)["devices"]] == tree != real
        rc, out, err = await phyllome(agent, "report")
        assert rc == 0 and "from the hardware agent of h1" in out, err
        rc, out, err = await phyllome(agent, "report", "--local", "--json")
        assert rc == 0 and [d["address"] for d in json.loads(out)["devices"]] == real, err
        rc, out, err = await phyllome(agent, "report", "--host", "h9")
        assert rc == 3 and "no hardware agent for host 'h9' answers" in err, (out, err)
    rc, out, err = await phyllome(agent, "report", "--json")  # NATS up, the agent gone
    assert rc == 0 and [d["address"] for d in json.loads(out)["devices"]] == real, err
    rc, out, err = await phyllome(agent, "report")
    assert rc == 0 and "scanned here: no hardware agent for host 'h1' answers" in out, err


async def test_cli_mdev_and_sriov(nats_server, tmp_path: Path) -> None:
    async with hw_agent(nats_server.url, tmp_path, "intel-gvtg") as (agent, _h, _b):
        rc, out, err = await phyllome(agent, "mdev", "types", "--json")
        assert rc == 0, err
        assert [t["id"] for t in json.loads(out)] == ["i915-GVTg_V5_4", "i915-GVTg_V5_8"]
        rc, out, err = await phyllome(agent, "mdev", "create", "00:02.0", "i915-GVTg_V5_8",
                                      "--json")
        assert rc == 0, err
        created = json.loads(out)["uuid"]
        rc, out, err = await phyllome(agent, "mdev", "remove", created)
        assert rc == 0 and "removed" in out, err
    async with hw_agent(nats_server.url, tmp_path / "b", "sriov-nic") as (agent, _h, _b):
        rc, out, err = await phyllome(agent, "sriov", "0000:03:00.0", "4")
        assert rc == 0 and "4 of 63 VFs" in out, err
        rc, out, err = await phyllome(agent, "sriov", "0000:05:00.0", "1")
        assert rc == 1 and "does not support SR-IOV" in err
