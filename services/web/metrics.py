"""Metrics of the web gateway, on an injected registry, served at ``/metrics`` of its listener.

Requests are counted by route template (``/api/v1/vms/{vm}/start``), never by the path a
client sent, so a scan of random paths cannot blow the series up::

    m = WebMetrics(CollectorRegistry(), host="h1", version="0.1.0")
    m.requests.labels(route="/api/v1/vms", method="GET", status="200").inc()
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from shared.metrics import LATENCY_BUCKETS

UNMATCHED = "unmatched"  # the route label of a request that matched no route


class WebMetrics:
    """Series named ``phyllome_web_...``."""

    def __init__(self, registry: CollectorRegistry, *, host: str, version: str) -> None:
        p = "phyllome_web"
        self.requests = Counter(
            f"{p}_http_requests", "HTTP requests answered, by route, method and status.",
            ["route", "method", "status"], registry=registry)
        self.request_duration = Histogram(
            f"{p}_http_request_duration_seconds", "Time to answer an HTTP request, by route.",
            ["route"], buckets=LATENCY_BUCKETS, registry=registry)
        self.auth_failures = Counter(
            f"{p}_auth_failures", "Requests refused for their token: missing, unknown, "
            "role too low, or an address made to wait.", ["reason"], registry=registry)
        self.audit_failed = Counter(
            f"{p}_audit_failed", "Audit events that JetStream did not store.", registry=registry)
        self.event_streams = Gauge(
            f"{p}_event_streams_open", "Server-Sent Event streams open now.", registry=registry)
        self.consoles = Gauge(
            f"{p}_consoles_open", "Browser consoles open now, by kind (vnc, serial).",
            ["kind"], registry=registry)
        self.console_bytes = Counter(
            f"{p}_console_bytes", "Console bytes relayed, by kind and direction (to_vm, "
            "to_browser).", ["kind", "direction"], registry=registry)
        self.build_info = Gauge(
            f"{p}_build_info", "Always 1; labels carry the version and host.",
            ["version", "host"], registry=registry)
        self.build_info.labels(version=version, host=host).set(1)
        self.up_since = Gauge(
            f"{p}_start_time_seconds", "Unix time the gateway started.", registry=registry)
        self.up_since.set_to_current_time()
