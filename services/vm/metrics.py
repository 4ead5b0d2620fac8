"""Metrics of the vm agent, on the agent's registry.

Per-VM counters come from ONE bulk statistics call to the hypervisor at scrape time (a
custom collector), so a scrape costs one libvirt round trip whatever the number of VMs::

    m = VmMetrics(agent.registry, hypervisor, started_at=lambda: {"<uuid>": 1700000000.0})
    with m.operation("start"):
        ...
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterator
from typing import get_args

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from services.vm.hypervisor import Hypervisor
from shared.errors import PhyError
from shared.messages.vm import VmState

log = logging.getLogger("phyllome.vm.metrics")

OPERATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class DomainCollector(Collector):
    """VMs by state and per-VM CPU, memory, disk and network counters, read at scrape time."""

    def __init__(self, hypervisor: Hypervisor,
                 started_at: Callable[[], dict[str, float]]) -> None:
        self.hypervisor = hypervisor
        self.started_at = started_at

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        p = "phyllome_vm"
        try:
            stats = self.hypervisor.bulk_stats()
        except PhyError as e:
            log.debug("no domain statistics: %s", e.message)
            stats = []
        by_state = GaugeMetricFamily(f"{p}_vms", "VMs on this host by state.", labels=["state"])
        tally = Tally(s.state for s in stats)
        for state in get_args(VmState):
            if state != "deleted":
                by_state.add_metric([state], tally.get(state, 0))
        yield by_state
        series = [
            ("cpu_seconds", "CPU time the VM used.", "cpu_time_s"),
            ("disk_read_bytes", "Bytes read from the VM's disks.", "block_read_bytes"),
            ("disk_written_bytes", "Bytes written to the VM's disks.", "block_write_bytes"),
            ("disk_reads", "Read requests of the VM's disks.", "block_read_ops"),
            ("disk_writes", "Write requests of the VM's disks.", "block_write_ops"),
            ("network_receive_bytes", "Bytes the VM's NICs received.", "net_rx_bytes"),
            ("network_transmit_bytes", "Bytes the VM's NICs sent.", "net_tx_bytes"),
            ("network_receive_packets", "Packets the VM's NICs received.", "net_rx_packets"),
            ("network_transmit_packets", "Packets the VM's NICs sent.", "net_tx_packets"),
        ]
        for name, doc, attr in series:
            family = CounterMetricFamily(f"{p}_{name}", doc, labels=["vm", "uuid"])
            for s in stats:
                family.add_metric([s.name, s.uuid], getattr(s, attr))
            yield family
        memory = GaugeMetricFamily(f"{p}_memory_bytes", "Memory the guest has (balloon).",
                                   labels=["vm", "uuid"])
        rss = GaugeMetricFamily(f"{p}_memory_rss_bytes", "Host memory the VM's process uses.",
                                labels=["vm", "uuid"])
        boot = GaugeMetricFamily(f"{p}_boot_time_seconds", "Unix time the VM last started.",
                                 labels=["vm", "uuid"])
        started = self.started_at()
        for s in stats:
            memory.add_metric([s.name, s.uuid], s.memory_bytes)
            rss.add_metric([s.name, s.uuid], s.memory_rss_bytes)
            if s.uuid in started and s.state in ("running", "paused", "blocked"):
                boot.add_metric([s.name, s.uuid], started[s.uuid])
        yield memory
        yield rss
        yield boot


class VmMetrics:
    """The vm agent's own series; per-VM ones come from ``DomainCollector``."""

    def __init__(self, registry: CollectorRegistry, hypervisor: Hypervisor,
                 started_at: Callable[[], dict[str, float]]) -> None:
        p = "phyllome_vm"
        self.operations = Counter(
            f"{p}_lifecycle_operations", "Lifecycle operations by kind and outcome.",
            ["operation", "outcome"], registry=registry)
        self.operation_duration = Histogram(
            f"{p}_lifecycle_operation_duration_seconds", "Time a lifecycle operation took.",
            ["operation"], buckets=OPERATION_BUCKETS, registry=registry)
        self.reconciliations = Counter(
            f"{p}_reconciliations", "Reconciliation passes against the hypervisor.",
            registry=registry)
        self.missed_events = Counter(
            f"{p}_missed_events", "State changes found by reconciliation, not by events.",
            registry=registry)
        self.hypervisor_reconnects = Counter(
            f"{p}_hypervisor_reconnects", "Reconnections to the hypervisor.", registry=registry)
        registry.register(DomainCollector(hypervisor, started_at))

    @contextlib.contextmanager
    def operation(self, name: str) -> Iterator[None]:
        """Count and time one lifecycle operation; the outcome is ok or the error kind."""
        started = time.perf_counter()
        outcome = "ok"
        try:
            yield
        except PhyError as e:
            outcome = e.kind
            raise
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except BaseException:
            outcome = "internal"
            raise
        finally:
            self.operations.labels(operation=name, outcome=outcome).inc()
            self.operation_duration.labels(operation=name).observe(time.perf_counter() - started)
