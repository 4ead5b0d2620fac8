"""Prometheus metrics of the catalogue agent, on the agent's registry.

    m = CatalogueMetrics(agent.registry)
    m.pulls.labels(outcome="succeeded").inc()
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

PULL_OUTCOMES = ("succeeded", "refused", "failed", "cancelled")


class CatalogueMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.images = Gauge(
            "phyllome_catalogue_images", "Catalogue entries by source and state "
            "(listed, downloadable, pulled)", ["source", "state"], registry=registry)
        self.pulls = Counter(
            "phyllome_catalogue_pulls_total", "Image pulls by outcome", ["outcome"],
            registry=registry)
        for outcome in PULL_OUTCOMES:
            self.pulls.labels(outcome=outcome)
        self.downloaded = Counter(
            "phyllome_catalogue_downloaded_bytes_total", "Bytes downloaded by image pulls",
            registry=registry)
        self.source_up = Gauge(
            "phyllome_catalogue_source_up", "1 when a source's index could be read at the "
            "last refresh", ["source"], registry=registry)
        self.links_broken = Gauge(
            "phyllome_catalogue_links_broken", "Image URLs that failed their last probe",
            ["source"], registry=registry)
        self.probes = Counter(
            "phyllome_catalogue_link_probes_total", "HEAD probes of image URLs by outcome",
            ["outcome"], registry=registry)
        for outcome in ("ok", "broken"):
            self.probes.labels(outcome=outcome)
