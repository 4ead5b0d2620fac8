"""Prometheus series of the hardware agent, on the agent's registry.

    m = HardwareMetrics(registry)
    m.uevents.labels(action="change").inc()
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from shared.messages.hardware import HostCaps, PciDevice

P = "phyllome_hardware"
UPDATE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25)


class HardwareMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.devices = Gauge(f"{P}_devices", "PCI functions in the inventory, by kind.",
                             ["kind"], registry=registry)
        self.scan_seconds = Gauge(f"{P}_scan_duration_seconds",
                                  "Time the last full inventory scan took.", registry=registry)
        self.uevents = Counter(f"{P}_uevents", "Kernel uevents of PCI devices, by action.",
                               ["action"], registry=registry)
        self.update_seconds = Histogram(
            f"{P}_uevent_update_duration_seconds",
            "Time to update the inventory for one device after a uevent.",
            buckets=UPDATE_BUCKETS, registry=registry)
        self.operations = Counter(f"{P}_operations", "Device operations, by verb and outcome.",
                                  ["verb", "outcome"], registry=registry)

    def watch(self, devices: Callable[[], list[PciDevice]],
              caps: Callable[[], HostCaps | None]) -> None:
        """Export the inventory's passthrough view, computed at scrape time."""
        self.registry_collector = InventoryCollector(devices, caps)
        self.registry.register(self.registry_collector)

    def count(self, kinds: list[str]) -> None:
        for kind in ("gpu", "audio", "usb", "net", "storage", "bridge", "other"):
            self.devices.labels(kind=kind).set(kinds.count(kind))


class InventoryCollector(Collector):
    """Devices by kind/driver and verdict, IOMMU groups, VFIO-bound devices and the host's
    virtualization capabilities, read from the inventory on each scrape."""

    def __init__(self, devices: Callable[[], list[PciDevice]],
                 caps: Callable[[], HostCaps | None]) -> None:
        self.devices = devices
        self.caps = caps

    def collect(self) -> Iterator[Any]:
        devices = self.devices()
        by_driver = GaugeMetricFamily(f"{P}_devices_by_driver",
                                      "PCI functions, by kind and driver in use.",
                                      labels=["kind", "driver"])
        counts: dict[tuple[str, str], int] = {}
        for d in devices:
            key = (d.kind, d.driver or "none")
            counts[key] = counts.get(key, 0) + 1
        for (kind, driver), n in sorted(counts.items()):
            by_driver.add_metric([kind, driver], n)
        yield by_driver
        verdicts = GaugeMetricFamily(f"{P}_passthrough_devices",
                                     "Non-bridge PCI functions, by passthrough verdict.",
                                     labels=["verdict"])
        tally = dict.fromkeys(("isolated", "with-companions", "shared-group", "no-iommu"), 0)
        for d in devices:
            if d.passthrough is not None:
                tally[d.passthrough.verdict] = tally.get(d.passthrough.verdict, 0) + 1
        for verdict, n in tally.items():
            verdicts.add_metric([verdict], n)
        yield verdicts
        groups = {d.iommu_group for d in devices if d.iommu_group is not None}
        yield GaugeMetricFamily(f"{P}_iommu_groups", "IOMMU groups on the host.",
                                value=len(groups))
        yield GaugeMetricFamily(f"{P}_vfio_bound_devices",
                                "PCI functions bound to vfio-pci.",
                                value=sum(1 for d in devices if d.driver == "vfio-pci"))
        caps = self.caps()
        if caps is not None:
            for name, value, text in (
                    ("kvm_usable", caps.kvm_usable, "1 when a guest booted under KVM here."),
                    ("nested", bool(caps.nested), "1 when nested virtualization is on."),
                    ("iommu_enabled", caps.iommu, "1 when the IOMMU is on.")):
                yield GaugeMetricFamily(f"{P}_{name}", text, value=int(value))
