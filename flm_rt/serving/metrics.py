"""The server's Prometheus metrics, on a registry of their own (several apps can live in one process)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServingMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("flm_rt_requests", "completion requests by HTTP status", ["status"], registry=r)
        self.latency = Histogram("flm_rt_request_latency_seconds", "completion request latency (to the last byte)",
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
                                 registry=r)
        self.batch_size = Histogram("flm_rt_batch_size", "samples per generate call",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.queue_depth = Gauge("flm_rt_queue_depth", "requests waiting for a batch", registry=r)
        self.running = Gauge("flm_rt_running_samples", "samples in the generate call now running", registry=r)
        self.tokens = Counter("flm_rt_tokens_generated", "completion tokens returned", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
