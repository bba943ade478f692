"""Prometheus metrics and the per-model statistics behind the ModelStatistics RPC.

Each server owns its own ``CollectorRegistry`` so several servers (tests, the bench) can live in
one process without clashing on metric names.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.inference.batcher import BatchReport

_LATENCY_BUCKETS_S = (
    0.0002,
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1.0,
    2.0,
    5.0,
)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "maas_inference_requests",
            "gRPC requests by method and status code",
            ["method", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "maas_inference_request_seconds",
            "gRPC request latency by method",
            ["method"],
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.batch_rows = Histogram(
            "maas_inference_batch_rows",
            "rows per forward pass",
            ["model", "version"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.queue_rows = Gauge(
            "maas_inference_queue_rows",
            "rows waiting for a forward pass",
            ["model", "version"],
            registry=r,
        )
        self.loaded_models = Gauge(
            "maas_inference_loaded_models", "model versions in the cache", registry=r
        )
        self.loaded_bytes = Gauge(
            "maas_inference_loaded_bytes", "bytes of weights in the cache", registry=r
        )
        # Per served version, so a canary's versions compare side by side (a split alias).
        self.version_requests = Counter(
            "maas_inference_version_requests",
            "inference requests by model, version and outcome (ok, error)",
            ["model", "version", "outcome"],
            registry=r,
        )
        self.version_latency = Histogram(
            "maas_inference_version_request_seconds",
            "inference request latency (queue and forward pass) by model and version",
            ["model", "version"],
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.loads = Counter(
            "maas_inference_model_loads",
            "model versions loaded (a first request, an alias moving, a reload after eviction)",
            ["model"],
            registry=r,
        )
        self.evictions = Counter(
            "maas_inference_model_evictions",
            "model versions evicted from the cache to make room (MAAS_INFERENCE_CACHE_BYTES)",
            ["model"],
            registry=r,
        )
        self.swaps = Counter(
            "maas_inference_swaps",
            "alias moves applied (ok) or refused (failed)",
            ["model", "outcome"],
            registry=r,
        )

    def forget_model(self, name: str, version: int | None = None) -> None:
        """Drop every series of ``name``'s ``version`` (or of every version), loaded or not:
        one evicted for room kept its counters, and unloading or deleting it must not leave
        them."""
        counted = {
            int(sample.labels["version"])
            for family in self.version_requests.collect()
            for sample in family.samples
            if sample.labels["model"] == name
        }
        for number in counted if version is None else counted & {version}:
            labels = (name, str(number))
            for metric in (self.queue_rows, self.batch_rows, self.version_latency):
                metric.remove(*labels)
            for outcome in ("ok", "error"):
                self.version_requests.remove(*labels, outcome)


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns


@dataclass
class ModelStats:
    """Counters for one served version; also the batcher's observer."""

    name: str
    version: int
    metrics: Metrics
    inference_count: int = 0  # rows answered
    execution_count: int = 0  # forward passes
    last_inference_ms: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute: Duration = field(default_factory=Duration)
    batches: defaultdict[int, Duration] = field(default_factory=lambda: defaultdict(Duration))

    def __post_init__(self) -> None:
        labels = (self.name, str(self.version))
        self._queue_gauge = self.metrics.queue_rows.labels(*labels)
        self._batch_rows = self.metrics.batch_rows.labels(*labels)
        self._ok = self.metrics.version_requests.labels(*labels, "ok")
        self._errors = self.metrics.version_requests.labels(*labels, "error")
        self._latency = self.metrics.version_latency.labels(*labels)

    def queue_depth(self, rows: int) -> None:
        self._queue_gauge.set(rows)

    def batch_done(self, report: BatchReport) -> None:
        self.execution_count += 1
        self.queue.add(report.queue_ns, report.requests)
        self.compute.add(report.compute_ns, report.requests)
        self.batches[report.rows].add(report.compute_ns)
        self._batch_rows.observe(report.rows)

    def request_done(self, *, ok: bool, rows: int, ns: int) -> None:
        (self._ok if ok else self._errors).inc()
        self._latency.observe(ns / 1e9)
        if ok:
            self.success.add(ns)
            self.inference_count += rows
            self.last_inference_ms = int(time.time() * 1000)
        else:
            self.fail.add(ns)

    def forget_queue(self) -> None:
        """Drop the queue gauge once this version leaves the cache. Its counters stay: one
        evicted for room counts on where it was when loaded again (a canary's counts must not
        restart with each reload); ``Metrics.forget_model`` drops them on unload or delete."""
        self.metrics.queue_rows.remove(self.name, str(self.version))
