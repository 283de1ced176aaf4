"""Prometheus metrics of one server (its own registry, so several apps in one process do not collide)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class _QueueDepth(Collector):
    """Queue depth per model and stage, read at scrape time."""

    def __init__(self, depths: Callable[[], Mapping[str, Mapping[str, int]]]) -> None:
        self._depths = depths

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "clipserve_queue_depth", "Items waiting per model and stage", labels=["model", "stage"]
        )
        for model, stages in self._depths().items():
            for stage, depth in stages.items():
                family.add_metric([model, stage], depth)
        yield family


class ServerMetrics:
    """The server's counters and histograms; also the `BatchObserver` of its batched models."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "clipserve_requests", "HTTP requests", ["route", "model", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "clipserve_request_seconds", "HTTP request latency", ["route", "model"],
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.batch_size = Histogram(
            "clipserve_batch_size", "Items per inference batch", ["model", "modality"],
            buckets=_BATCH_BUCKETS, registry=self.registry,
        )
        self.images_decoded = Counter(
            "clipserve_images_decoded", "Images decoded", ["model", "outcome"], registry=self.registry
        )
        self.errors = Counter("clipserve_errors", "Error responses by type", ["type"], registry=self.registry)

    def track_queues(self, queue_depths: Callable[[], Mapping[str, Mapping[str, int]]]) -> None:
        """Report `queue_depths()` (model -> stage -> items) at every scrape."""
        self.registry.register(_QueueDepth(queue_depths))

    def observe_request(self, route: str, model: str, status: int, seconds: float) -> None:
        self.requests.labels(route, model, str(status)).inc()
        self.latency.labels(route, model).observe(seconds)

    def error(self, kind: str) -> None:
        self.errors.labels(kind).inc()

    # BatchObserver
    def batch_started(self, model: str, modality: str, size: int) -> None:
        self.batch_size.labels(model, modality).observe(size)

    def image_decoded(self, model: str, ok: bool) -> None:
        self.images_decoded.labels(model, "ok" if ok else "error").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
