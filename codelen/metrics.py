"""Prometheus metrics, one registry per app instance (tests build many apps in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("codelen_http_requests", "HTTP requests", ["route", "status"], registry=r)
        self.latency = Histogram(
            "codelen_http_latency_seconds", "HTTP latency", ["route"], registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.cache = Counter("codelen_cache_lookups", "Cache lookups of code lengths", ["result"], registry=r)
        self.tasks = Counter("codelen_tasks_computed", "Code lengths computed", ["model"], registry=r)
        self.task_failures = Counter("codelen_task_failures", "Code lengths that failed", ["model"], registry=r)
        self.batch_size = Histogram(
            "codelen_batch_tasks", "Tasks per model batch", registry=r, buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
        )
        self.stage = Histogram(
            "codelen_stage_seconds", "Time per worker stage", ["stage"], registry=r,
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60),
        )
        self.queue_depth = Gauge("codelen_queue_depth", "Tasks waiting for a worker", registry=r)
        self.jobs = Counter("codelen_jobs", "Jobs by final status", ["status"], registry=r)
        self.models_loaded = Gauge(
            "codelen_models_loaded", "Models whose weights this process holds (1 each)", ["model"], registry=r
        )
        self.classify_values = Counter(
            "codelen_classify_values",
            "Values of classifier model passes (segment code lengths, features, token states) by where they came from",
            ["outcome"],  # computed: the model ran; reused: the cache had it
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
