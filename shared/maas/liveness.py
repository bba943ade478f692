"""Liveness of a service's background loops: health and metrics say when one died, and why.

Every service runs loops beside its request handling (the bus's consumers, the registry's outbox
relay). A loop that dies must not leave the service answering SERVING while it does no work,
nor kill the process into a restart loop on the same record: ``Liveness.supervise`` reports it.
Services without a gRPC health service (the Kafka consumers) serve it over HTTP beside their
metrics: ``serve_metrics`` answers ``/healthz`` with 200 ``SERVING`` or 503 ``NOT_SERVING: why``,
and ``/readyz`` (``maas.readiness``: what it works through answers too) with 200 ``READY`` or 503
``NOT_READY: why``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Gauge, make_wsgi_app

from maas import events
from maas.errors import MaasError
from maas.readiness import Dependencies

log = logging.getLogger(__name__)

HealthHook = Callable[[str | None], Awaitable[None]]
METRICS_PATH = "/metrics"
HEALTH_PATH = "/healthz"
READY_PATH = "/readyz"
# An event loop that has not run for this long is stalled: health says so until it runs again.
# /healthz answers from a thread of its own, so without this it said SERVING while a request
# held the loop for 12 s and every client, and the Kafka heartbeats, waited.
LOOP_STALL_S = 10.0


class Liveness:
    """Which of a service's background loops still run; one that died says why.

    ``supervise`` runs a loop (a consumer's ``run``, a relay): when it ends on an error, the
    gauge ``maas_loop_up{loop}`` drops to 0, the reason is logged and kept in ``failures``, and
    ``on_change`` gets the reasons (the service turns its health NOT_SERVING). The process stays
    up, saying why it does no work, instead of dying in a restart loop. ``dependencies`` are
    what it works through (the service adds them): readiness, not liveness.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        on_change: HealthHook | None = None,
        stall_after_s: float = LOOP_STALL_S,
    ) -> None:
        self.failures: dict[str, str] = {}
        self._on_change = on_change
        self._stall_after_s = stall_after_s
        self._loop_seen: float | None = None  # when ``watch_loop`` last ran (monotonic)
        registry = CollectorRegistry() if registry is None else registry
        self._up = Gauge(
            "maas_loop_up",
            "1 while the named background loop runs, 0 once it stopped on an error",
            ["loop"],
            registry=registry,
        )
        self.dependencies = Dependencies(registry)

    @property
    def healthy(self) -> bool:
        return not self.failures and self._stalled() is None

    @property
    def reason(self) -> str | None:
        """Why the service is unhealthy, or None."""
        reasons = [f"{name}: {why}" for name, why in self.failures.items()]
        stalled = self._stalled()
        return "; ".join([*reasons, stalled] if stalled else reasons) or None

    @property
    def ready_reason(self) -> str | None:
        """Why the service cannot do all its work now (not live, or a dependency away), or None."""
        reasons = [why for why in (self.reason, self.dependencies.reason) if why]
        return "; ".join(reasons) or None

    async def watch_loop(self, period_s: float = 1.0) -> None:
        """Note every ``period_s`` that the event loop runs (until cancelled), so health read
        from another thread can say when it has stopped running."""
        while True:
            self._loop_seen = time.monotonic()
            await asyncio.sleep(period_s)

    def _stalled(self) -> str | None:
        if self._loop_seen is None:
            return None
        silent = time.monotonic() - self._loop_seen
        if silent < self._stall_after_s:
            return None
        return f"the event loop has not run for {silent:.0f} s (a request or job is holding it)"

    def set_condition(self, name: str, why: str | None) -> None:
        """A condition, not a loop, that keeps the service from its work while it lasts
        (``why``; None: it ended): health says so as it says a stopped loop. ``on_change``
        is not called: it hears of loops, which do not come back."""
        if why is None:
            self.failures.pop(name, None)
        else:
            self.failures[name] = events.clip(why)

    async def supervise(self, name: str, loop: Awaitable[None]) -> None:
        """Await ``loop``; if it fails, report it and wait (until cancelled) instead of raising."""
        self._up.labels(name).set(1)
        try:
            await loop
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            why = exc.message if isinstance(exc, MaasError) else f"{type(exc).__name__}: {exc}"
            log.error("%s stopped: %s", name, why, exc_info=not isinstance(exc, MaasError))
            self.failures[name] = events.clip(why)
        self._up.labels(name).set(0)
        if self._on_change is not None:
            await self._on_change(self.reason)
        await asyncio.Event().wait()


# The port takes no token (Prometheus and probes scrape it), so what one client may hold is
# bounded: each connection is a thread, and 800 idle ones were 800 threads and fds, held forever.
MAX_METRICS_CONNECTIONS = 32  # more at once are closed unanswered
METRICS_IDLE_TIMEOUT_S = 10.0  # a connection silent this long, or half-sent, is closed


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True

    def server_activate(self) -> None:
        super().server_activate()
        self._connections = threading.BoundedSemaphore(MAX_METRICS_CONNECTIONS)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._connections.acquire(blocking=False):
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._connections.release()


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Quiet(WSGIRequestHandler):
    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(METRICS_IDLE_TIMEOUT_S)

    def log_message(self, format: str, *args: Any) -> None:  # scrapes and probes: not news
        pass


def serve_metrics(
    port: int, addr: str, registry: CollectorRegistry, liveness: Liveness
) -> WSGIServer:
    """Prometheus text at ``/metrics``. ``/healthz`` says whether every supervised loop runs
    (200 ``SERVING``) or not (503 ``NOT_SERVING: <reason>``); ``/readyz`` says whether,
    besides, every dependency answers (200 ``READY`` or 503 ``NOT_READY: <reason>``); any other
    path is 404 naming these three. Serves from a daemon thread; ``shutdown()`` the returned
    server to stop it."""
    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO")
        if path == METRICS_PATH:
            return metrics(environ, start_response)  # type: ignore[no-any-return]
        if path == HEALTH_PATH:
            return _answer(start_response, "SERVING", "NOT_SERVING", liveness.reason)
        if path == READY_PATH:
            return _answer(start_response, "READY", "NOT_READY", liveness.ready_reason)
        return _not_found(start_response)

    server_class = _Server6 if ":" in addr else _Server
    server = make_server(addr, port, app, server_class, _Quiet)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server


def _not_found(start_response: Callable[..., Any]) -> Iterable[bytes]:
    start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
    served = f"{METRICS_PATH}, {HEALTH_PATH} and {READY_PATH}"
    return [f"not found: this port serves {served}\n".encode()]


def _answer(
    start_response: Callable[..., Any], good: str, bad: str, reason: str | None
) -> Iterable[bytes]:
    body = good if reason is None else f"{bad}: {reason}"
    status = "200 OK" if reason is None else "503 Service Unavailable"
    start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
    return [body.encode(errors="backslashreplace")]
