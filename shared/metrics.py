"""Prometheus metrics of an agent: the common series, on an injected registry, and /metrics.

Agent-specific series live in each agent's ``metrics.py`` on the same registry::

    registry = CollectorRegistry()
    m = AgentMetrics(registry, "vm", host="h1", version="0.1.0")
    m.requests.labels(endpoint="start", outcome="ok").inc()
    port = serve(registry, "127.0.0.1", 0)
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5,
                   10, 30, 60)


class AgentMetrics:
    """Series every agent exports, named ``phyllome_<agent>_...``."""

    def __init__(self, registry: CollectorRegistry, agent: str, *, host: str, version: str):
        p = f"phyllome_{agent}"
        self.requests = Counter(
            f"{p}_requests", "Requests handled, by endpoint and outcome (ok or error kind).",
            ["endpoint", "outcome"], registry=registry)
        self.request_duration = Histogram(
            f"{p}_request_duration_seconds", "Time to handle a request, by endpoint.",
            ["endpoint"], buckets=LATENCY_BUCKETS, registry=registry)
        self.events_published = Counter(
            f"{p}_events_published", "Events published to JetStream, by kind.",
            ["kind"], registry=registry)
        self.events_failed = Counter(
            f"{p}_events_failed", "Events that JetStream did not acknowledge.",
            registry=registry)
        self.bus_connected = Gauge(
            f"{p}_bus_connected", "1 while the agent is connected to NATS.", registry=registry)
        self.bus_reconnects = Counter(
            f"{p}_bus_reconnects", "Reconnections to NATS since start.", registry=registry)
        self.jobs = Counter(
            f"{p}_jobs", "Jobs finished, by kind and final state.", ["kind", "state"],
            registry=registry)
        self.jobs_running = Gauge(
            f"{p}_jobs_running", "Jobs running now.", registry=registry)
        self.build_info = Gauge(
            f"{p}_build_info", "Always 1; labels carry the version and host.",
            ["version", "host"], registry=registry)
        self.build_info.labels(version=version, host=host).set(1)
        self.up_since = Gauge(
            f"{p}_start_time_seconds", "Unix time the agent started.", registry=registry)
        self.up_since.set_to_current_time()


def serve(registry: CollectorRegistry, host: str, port: int) -> int:
    """Serve ``/metrics`` in a thread; returns the bound port (``port=0`` picks one)."""
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return int(server.server_port)
