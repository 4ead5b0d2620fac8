"""Prometheus series of the storage agent, on the agent's registry.

Pool figures are read from the filesystem when scraped, so they are never stale::

    m = StorageMetrics(registry, pools)
    m.clones.labels(method="reflink", outcome="succeeded").inc()
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from services.storage.volumes import Pools

P = "phyllome_storage"
DURATION_BUCKETS = (0.001, 0.01, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)


class PoolCollector(Collector):
    """Capacity, free, allocated and virtual bytes and volume count per pool, at scrape time."""

    def __init__(self, pools: Pools) -> None:
        self.pools = pools

    def collect(self) -> Iterator[Metric]:
        series = {
            "capacity_bytes": "Size of the pool's filesystem.",
            "free_bytes": "Free space of the pool's filesystem.",
            "allocated_bytes": "Bytes allocated by the pool's volumes.",
            "virtual_bytes": "Sum of the virtual sizes of the pool's volumes.",
            "volumes": "Volumes in the pool.",
        }
        families = {k: GaugeMetricFamily(f"{P}_pool_{k}", doc, labels=["pool"])
                    for k, doc in series.items()}
        for name in self.pools.pools:
            try:
                info = self.pools.pool_info(name)
            except Exception:  # a pool that cannot be read has no figures this scrape
                continue
            figures = {"capacity_bytes": info.capacity_bytes, "free_bytes": info.free_bytes,
                       "allocated_bytes": info.allocated_bytes,
                       "virtual_bytes": info.virtual_bytes, "volumes": info.volumes}
            for key, value in figures.items():
                families[key].add_metric([name], value)
        yield from families.values()


class StorageMetrics:
    def __init__(self, registry: CollectorRegistry, pools: Pools) -> None:
        registry.register(PoolCollector(pools))
        self.clones = Counter(
            f"{P}_clones", "Clones and imports finished, by method (reflink, copy, rename) "
            "and outcome.", ["method", "outcome"], registry=registry)
        self.transfers = Counter(
            f"{P}_transfers", "Transfers finished, by direction (send, receive) and outcome.",
            ["direction", "outcome"], registry=registry)
        self.copied = Counter(
            f"{P}_copied_bytes", "Data bytes copied or sent, by operation (clone, send, "
            "receive).", ["op"], registry=registry)
        self.holes = Counter(
            f"{P}_hole_bytes", "Virtual bytes skipped as holes (never read nor sent), by "
            "operation.", ["op"], registry=registry)
        self.wire = Counter(
            f"{P}_wire_bytes", "Chunk bytes put on the wire by transfers, resends included.",
            registry=registry)
        self.checksum_failures = Counter(
            f"{P}_checksum_failures", "Chunks or volumes that failed their checksum, by side "
            "(send, receive).", ["side"], registry=registry)
        self.chunks_dropped = Counter(
            f"{P}_chunks_dropped", "Transfer chunks a receiver refused, by reason: forged (not "
            "signed with the transfer's key), corrupt (failed its checksum: sent again), "
            "invalid (outside the extent map), unknown_transfer (none in progress: offered "
            "again).", ["reason"], registry=registry)
        self.duration = Histogram(
            f"{P}_operation_duration_seconds", "Time of clones, imports and transfers, by "
            "operation.", ["op"], buckets=DURATION_BUCKETS, registry=registry)
        self.throughput = Histogram(
            f"{P}_throughput_bytes_per_second", "Data bytes per second of copies and "
            "transfers, by operation.", ["op"],
            buckets=tuple(float(1 << n) for n in range(20, 36, 2)), registry=registry)
