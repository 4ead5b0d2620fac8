"""Prometheus series of the hardware agent, on the agent's registry.

    m = HardwareMetrics(registry)
    m.uevents.labels(action="change").inc()
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

P = "phyllome_hardware"
UPDATE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25)


class HardwareMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
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

    def count(self, kinds: list[str]) -> None:
        for kind in ("gpu", "audio", "usb", "net", "storage", "bridge", "other"):
            self.devices.labels(kind=kind).set(kinds.count(kind))
