"""Prometheus metrics, one registry per agent (tests run several agents in one process)."""
from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,  # noqa: F401  (re-exported for the server)
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "kvmagent_requests", "Commands received", ["path", "outcome"], registry=r)
        self.latency = Histogram(
            "kvmagent_request_duration_seconds", "Command run time (async: until the result)",
            ["path"], registry=r,
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
        self.tasks_in_flight = Gauge(
            "kvmagent_async_tasks_in_flight", "Accepted async commands still running", registry=r)
        self.deliveries_retried = Counter(
            "kvmagent_delivery_retries", "Callback/report delivery attempts that will be retried",
            ["kind"], registry=r)
        self.deliveries_failed = Counter(
            "kvmagent_delivery_failures", "Callbacks/reports given up after the retry window",
            ["kind"], registry=r)
        self.deliveries_pending = Gauge(
            "kvmagent_deliveries_pending", "Callbacks/reports waiting for delivery", registry=r)
        self.libvirt_connected = Gauge(
            "kvmagent_libvirt_connected", "1 while the libvirt connection is open", registry=r)

        self._children: dict[tuple[str, str], tuple] = {}

    def command_done(self, path: str, outcome: str, seconds: float) -> None:
        """Count one command; the labelled children are cached (labels() is the hot-path cost)."""
        children = self._children.get((path, outcome))
        if children is None:
            children = (self.requests.labels(path, outcome), self.latency.labels(path))
            self._children[(path, outcome)] = children
        children[0].inc()
        children[1].observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
