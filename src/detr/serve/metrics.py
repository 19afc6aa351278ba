"""Prometheus metrics of one app (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self, max_batch: int, queue_length: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("detr_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=self.registry)
        self.latency = Histogram("detr_request_seconds", "Request latency by route", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("detr_batch_size", "Images per model forward, by kind", ["kind"],
                                    buckets=tuple(range(1, max_batch + 1)), registry=self.registry)
        self.expired = Counter("detr_expired_jobs", "Queued requests dropped past their deadline",
                               registry=self.registry)
        self.queue = Gauge("detr_queue_length", "Requests waiting for the model", registry=self.registry)
        self.queue.set_function(queue_length)
        self.in_flight = Gauge("detr_in_flight_requests", "Requests being answered", registry=self.registry)

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def text(self) -> bytes:
        return generate_latest(self.registry)
