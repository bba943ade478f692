"""The inference server's gRPC edge: ``maas.edge``'s interceptor (auth, status mapping with an
INTERNAL fallback that carries only a request id) observing into inference's metrics.

``ErrorMappingInterceptor`` and ``status_for`` keep their names for this service's code; the
logic lives in ``maas.edge``.
"""

from __future__ import annotations

from typing import Any

import grpc

from maas.edge import Authorizer, EdgeInterceptor, Observer, status_for
from services.inference.metrics import Metrics

__all__ = ["ErrorMappingInterceptor", "metrics_observer", "status_for"]


def metrics_observer(metrics: Metrics) -> Observer:
    """Counts each call by (method, code) and times it by method; label children cached."""
    counters: dict[tuple[str, grpc.StatusCode], Any] = {}
    timers: dict[str, Any] = {}

    def observe(method: str, code: grpc.StatusCode, seconds: float) -> None:
        counter = counters.get((method, code))
        if counter is None:
            counter = counters[method, code] = metrics.requests.labels(method, code.name)
        timer = timers.get(method)
        if timer is None:
            timer = timers[method] = metrics.latency.labels(method)
        counter.inc()
        timer.observe(seconds)

    return observe


class ErrorMappingInterceptor(EdgeInterceptor):
    """The edge interceptor with ``metrics`` counting and timing every call."""

    def __init__(self, metrics: Metrics, authorizer: Authorizer) -> None:
        super().__init__(authorizer, metrics_observer(metrics))
