"""The hardware agent's endpoints and its uevent loop.

Reads answer from the inventory kept in memory (scanned at start, then updated one device
per uevent); bind and release are jobs; each device change is an event
``phy.evt.<host>.hardware.device.{added,changed,removed}``::

    handlers = Handlers(agent, fs, inventory, operations, settings, metrics)
    await handlers.begin()              # scan, KVM check, caps into the heartbeat, uevents
    await handlers.list(DeviceQuery(kind="gpu"))
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import msgspec

from services.hardware.config import Settings
from services.hardware.inventory import Inventory, host_caps
from services.hardware.kvm import ProbeOutcome, probe_in_child
from services.hardware.metrics import HardwareMetrics
from services.hardware.operations import Operations
from services.hardware.sysfs import Sysfs, UeventMonitor
from shared import subjects
from shared.agent import Agent
from shared.errors import PhyError
from shared.jobs import Job
from shared.messages import Ack, Empty
from shared.messages.hardware import (
    BindRequest,
    BootProbe,
    DeviceAdded,
    DeviceChanged,
    DeviceList,
    DeviceQuery,
    DeviceRef,
    DeviceRemoved,
    GroupList,
    HostCaps,
    HwReport,
    MdevCreate,
    MdevInfo,
    MdevRef,
    PciDevice,
    ProbeResult,
    SriovSet,
)
from shared.messages.hosts import Heartbeat
from shared.messages.jobs import JobAccepted

log = logging.getLogger("phyllome.hardware")
T = TypeVar("T")
Result = dict[str, object]


class Handlers:
    def __init__(self, agent: Agent, fs: Sysfs, inventory: Inventory, ops: Operations,
                 settings: Settings, metrics: HardwareMetrics) -> None:
        self.agent = agent
        self.fs = fs
        self.inv = inventory
        self.ops = ops
        self.settings = settings
        self.metrics = metrics
        self.kvm_ioctl: ProbeOutcome | None = None
        self._boot_probe: ProbeResult = "not-run"
        self.last_caps: HostCaps | None = None  # as last computed; read by the metrics
        self.monitor: UeventMonitor | None = None

    async def begin(self) -> None:
        self.monitor = self.fs.monitor()  # first, so that no uevent during the scan is lost
        started = time.perf_counter()
        await asyncio.to_thread(self.inv.scan)
        self.metrics.scan_seconds.set(time.perf_counter() - started)
        self._count()
        for key in await self.ops.recover():
            log.warning("IOMMU group %s: an interrupted bind was rolled back", key)
        if self.fs.real and self.fs.kvm_device():
            self.kvm_ioctl = await asyncio.to_thread(
                probe_in_child, self.settings.kvm_probe_timeout_s)
        self._boot_probe = await self._boot_probe_from_kv()
        self._set_caps()
        if self.monitor is not None:
            asyncio.get_running_loop().add_reader(self.monitor.fileno(), self._on_uevents)

    async def close(self) -> None:
        if self.monitor is not None:
            asyncio.get_running_loop().remove_reader(self.monitor.fileno())
            self.monitor = None

    # -- caps -----------------------------------------------------------------------------------

    async def _boot_probe_from_kv(self) -> ProbeResult:
        """The VM agent's verdict from its heartbeat, when it ran before this agent started."""
        try:
            kv = await self.agent.bus.kv(subjects.KV_HOSTS)
            entry = await kv.get(subjects.heartbeat_key(self.agent.host, "vm"))
            hb = msgspec.json.decode(entry.value or b"", type=Heartbeat)
        except Exception:  # no VM agent yet (the key is missing): it will call boot_probe
            return "not-run"
        usable = hb.details.accelerator.kvm_usable if hb.details.accelerator else None
        return "not-run" if usable is None else "passed" if usable else "failed"

    def _set_caps(self) -> HostCaps:
        self.last_caps = host_caps(self.fs, self.kvm_ioctl, self._boot_probe)
        self.agent.details = msgspec.structs.replace(self.agent.details, caps=self.last_caps)
        return self.last_caps

    # -- uevents ----------------------------------------------------------------------------------

    def _on_uevents(self) -> None:
        if self.monitor is None:
            return
        for action, address in self.monitor.drain():
            self.metrics.uevents.labels(action=action).inc()
            self.agent.spawn(self.device_event(action, address), f"uevent-{address}")

    async def device_event(self, action: str, address: str) -> None:
        """Update the inventory for one device and publish what happened to it."""
        started = time.perf_counter()
        change, dev = self.inv.update(address)
        self.metrics.update_seconds.observe(time.perf_counter() - started)
        if action == "remove" or dev is None:
            await self.agent.publish("device.removed", DeviceRemoved(
                host=self.agent.host, address=address))
        elif change == "added":
            await self.agent.publish("device.added", DeviceAdded(host=self.agent.host,
                                                                 device=dev))
        else:
            await self.agent.publish("device.changed", DeviceChanged(
                host=self.agent.host, device=dev, action=action))
        self._count()

    def _count(self) -> None:
        self.metrics.count([d.kind for d in self.inv.devices()])

    # -- reads ----------------------------------------------------------------------------------

    async def list(self, req: DeviceQuery) -> DeviceList:
        return DeviceList(devices=self.inv.devices(req.kind))

    async def device(self, req: DeviceRef) -> PciDevice:
        return self.inv.device(req.address)

    async def groups(self, req: Empty) -> GroupList:
        return GroupList(iommu=self.inv.iommu, groups=self.inv.groups(), hint=self.inv.iommu_hint)

    async def caps(self, req: Empty) -> HostCaps:
        return self.last_caps or self._set_caps()

    async def report(self, req: Empty) -> HwReport:
        return self.inv.report(self.last_caps or self._set_caps())

    async def boot_probe(self, req: BootProbe) -> HostCaps:
        self._boot_probe = req.result
        caps = self._set_caps()
        await self.agent.beat()
        return caps

    # -- operations -----------------------------------------------------------------------------

    async def bind(self, req: BindRequest) -> JobAccepted:
        devices = self._checked("bind", lambda: self.ops.plan_bind(req))
        return self._job("bind", f"IOMMU group {devices[0].iommu_group}", f"bind of {req.address}",
                         lambda job: self.ops.bind(devices, job.progress,
                                                   single_gpu=req.single_gpu),
                         [d.address for d in devices])

    async def release(self, req: DeviceRef) -> JobAccepted:
        key, binding = self._checked("release", lambda: self.ops.plan_release(req.address))
        return self._job("release", f"IOMMU group {key}", f"release of {req.address}",
                         lambda job: self.ops.release(key, binding, job.progress),
                         sorted(binding.drivers))

    def _job(self, verb: str, key: str, what: str, work: Callable[[Job], Awaitable[Result]],
             addresses: Sequence[str]) -> JobAccepted:
        """Claim the group now (so a second request is refused at once), then run a job."""
        self.ops.claim(key, what)

        async def run(job: Job) -> Result:
            outcome = "failed"
            try:
                result = await work(job)
                outcome = "succeeded"
                return result
            except asyncio.CancelledError:
                outcome = "cancelled"
                raise
            finally:
                self.ops.unclaim(key)
                self.metrics.operations.labels(verb=verb, outcome=outcome).inc()
                for addr in addresses:
                    await self._changed(addr, verb)

        try:
            return self.agent.jobs.start(verb, run)
        except BaseException:
            self.ops.unclaim(key)
            raise

    def _checked(self, verb: str, fn: Callable[[], T]) -> T:
        """Run a check or a quick operation, counting refusals by kind."""
        try:
            result = fn()
        except PhyError as e:
            self.metrics.operations.labels(verb=verb, outcome=e.kind).inc()
            raise
        return result

    async def _quick(self, verb: str, key: str, fn: Callable[[], Awaitable[T]]) -> T:
        """A short operation (mdev, SR-IOV) under the same one-at-a-time claim as jobs."""
        self.ops.claim(key, verb)
        try:
            result = await fn()
        except PhyError as e:
            self.metrics.operations.labels(verb=verb, outcome=e.kind).inc()
            raise
        finally:
            self.ops.unclaim(key)
        self.metrics.operations.labels(verb=verb, outcome="succeeded").inc()
        return result

    async def _changed(self, address: str, action: str) -> None:
        try:
            dev = self.inv.device(address)
        except PhyError:
            return
        await self.agent.publish("device.changed", DeviceChanged(
            host=self.agent.host, device=dev, action=action))

    async def mdev_create(self, req: MdevCreate) -> MdevInfo:
        info = await self._quick("mdev_create", f"mdev parent {req.address}",
                                 lambda: self.ops.mdev_create(req))
        await self._changed(info.parent, "mdev_create")
        return info

    async def mdev_remove(self, req: MdevRef) -> Ack:
        info = await self._quick("mdev_remove", f"mdev {req.uuid}",
                                 lambda: self.ops.mdev_remove(req.uuid))
        await self._changed(info.parent, "mdev_remove")
        return Ack(message=f"mediated device {info.uuid} of {info.parent} removed")

    async def sriov_set(self, req: SriovSet) -> PciDevice:
        before = self.inv.device(req.address).virtfns
        dev = await self._quick("sriov_set", f"SR-IOV of {req.address}",
                                lambda: self.ops.sriov_set(req.address, req.num_vfs))
        if dev.virtfns != before:  # the kernel destroyed every old VF and made the new ones
            for vf in before:
                await self.agent.publish("device.removed", DeviceRemoved(
                    host=self.agent.host, address=vf))
            for vf in dev.virtfns:
                await self.agent.publish("device.added", DeviceAdded(
                    host=self.agent.host, device=self.inv.device(vf)))
        await self._changed(dev.address, "sriov_set")
        return dev
