"""How every service process lives and dies: ``serve(build, settings)``.

A service's ``__main__`` is settings from env, then ``serve`` with how to build the service.
``serve`` configures logging, lifts the open-files limit, builds the service on its event loop,
caps compute threads, starts it, opens ``/metrics``, ``/healthz`` and ``/readyz``
(``maas.liveness``, ``maas.readiness``) once it started (the port answering means the service
is up), runs it until SIGTERM/SIGINT or until ``run`` crashes (the process then exits with
that error instead of idling: a ``MaasError`` as one line naming it, anything else with its
traceback), and always stops it. A process whose service stopped cleanly
ends without collecting garbage first (``exit_stopped``).
Shutdown (stop accepting, drain, close) belongs in the service's ``stop``.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import resource
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client import CollectorRegistry

from maas.config import Settings
from maas.errors import MaasError
from maas.liveness import Liveness, serve_metrics

log = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(settings: Settings) -> None:
    log_to_stderr(settings.log_level)


def log_to_stderr(level: str) -> None:
    """This process's log lines to stderr, as every service writes them (a child process a
    service starts calls it too: without it, only warnings reach stderr, bare), with the Kafka
    clients' and asyncio's repeated lines thinned out (``RepeatedLineThrottle``)."""
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RepeatedLineThrottle) for f in handler.filters):
            handler.addFilter(RepeatedLineThrottle())


# The Kafka client libraries' logger names (and their children's): while the broker is away they
# log every reconnect attempt, several times a second in every client of every process.
KAFKA_CLIENT_LOGGERS = ("aiokafka", "kafka")


# Out of file descriptors, asyncio's accept loop logs "socket.accept() out of system resource"
# with a traceback up to its listen backlog's count of times (aiohttp's: 128) in every
# second the process stays out: about 900 lines a second from one HTTP port.
THROTTLED_LOGGERS = (*KAFKA_CLIENT_LOGGERS, "asyncio")


def is_kafka_client(logger_name: str) -> bool:
    return _is_under(logger_name, KAFKA_CLIENT_LOGGERS)


def _is_under(logger_name: str, names: tuple[str, ...]) -> bool:
    return any(logger_name == name or logger_name.startswith(f"{name}.") for name in names)


class RepeatedLineThrottle(logging.Filter):
    """Lets a line of a Kafka client or of asyncio through at most once per ``period_s`` for
    each logger and message template (``record.msg``: the node id or address a reconnect names
    does not make it news); the next one let through counts those held back. Other loggers pass
    untouched, and an asyncio line whose message is its own (a task's failure names the task)
    passes the first time it is logged.

    A 20-s broker outage wrote about 15,600 lines across the stack's services, 280 a second
    from one process; one line per template and period says the same. It sits on a handler,
    not on the ``aiokafka`` logger: a logger's filters miss its children's records."""

    def __init__(
        self,
        period_s: float = 30.0,
        *,
        max_templates: int = 256,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self._period_s = period_s
        self._max_templates = max_templates  # a client that formats into msg must not grow it
        self._clock = clock
        # By (logger, template), in the order they were last let through: the first is the
        # stalest when the cap is reached.
        self._seen: dict[tuple[str, str], _Seen] = {}
        self._lock = threading.Lock()  # handlers filter on whichever thread logs

    def filter(self, record: logging.LogRecord) -> bool:
        if not _is_under(record.name, THROTTLED_LOGGERS):
            return True
        key = (record.name, str(record.msg))
        now = self._clock()
        with self._lock:
            seen = self._seen.get(key)
            if seen is not None and now - seen.since < self._period_s:
                seen.held += 1
                return False
            self._let_through(key, now)
        if seen is not None and seen.held:
            _append(record, f" (and {seen.held} more like it in the last {now - seen.since:.0f} s)")
        return True

    def _let_through(self, key: tuple[str, str], now: float) -> None:
        self._seen.pop(key, None)
        self._seen[key] = _Seen(now)
        if len(self._seen) > self._max_templates:
            del self._seen[next(iter(self._seen))]


@dataclass(slots=True)
class _Seen:
    since: float  # when the last one was let through
    held: int = 0  # how many were held back since


def _append(record: logging.LogRecord, note: str) -> None:
    """Add ``note`` to the record's message (formatted now: a ``%`` in it is not a field)."""
    record.msg = record.getMessage() + note
    record.args = None


def limit_compute_threads(threads: int) -> None:
    """Cap the thread pools of what this process computes with: torch's intra-op threads (if
    torch is loaded) and the BLAS/OpenMP pools numpy and scipy use. Call it after the service's
    imports. Several such processes share a host's cores; a pool wider than its share spins
    waiting for threads the scheduler gave to a neighbour (a 0.1 ms ``saxpy`` took 14 ms so)."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=threads)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)


# Where the hard limit is "unlimited", the kernel still refuses more than nr_open (2^20 by default).
OPEN_FILES_CEILING = 1 << 20


def raise_open_files_limit() -> None:
    """Lift this process's soft limit on open files to its hard limit. Each connection a server
    holds is a file: under the common soft limit of 1024, a thousand idle clients (each held up
    to the idle timeout) leave none for S3, Kafka or the next caller. Go's runtime does the same
    for every program; the hard limit stays the operator's."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = OPEN_FILES_CEILING if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-files limit from %d to %d: %s", soft, target, exc)


def run_until_signalled(serve: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run ``serve(stop)`` on a fresh event loop; SIGTERM and SIGINT set ``stop``."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(stop)

    asyncio.run(main())


async def run_until_stopped(work: Coroutine[Any, Any, None], stop: asyncio.Event) -> None:
    """Run ``work`` until ``stop`` is set; a crash of ``work`` propagates (the process exits
    with its error instead of idling). On stop, ``work`` is cancelled and awaited."""
    running = asyncio.create_task(work)
    stopping = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait([running, stopping], return_when=asyncio.FIRST_COMPLETED)
        if running in done:
            running.result()  # a loop that ends on its own has crashed
    finally:
        stopping.cancel()
        running.cancel()
        await asyncio.gather(running, stopping, return_exceptions=True)


class Service(Protocol):
    """What ``serve`` runs. ``start`` opens what the service needs (an error ends the process
    with the reason), ``run`` works until cancelled (returning means it crashed), ``stop``
    closes whatever ``start`` opened. ``liveness`` says which background loops stopped, and why:
    ``/healthz`` answers from it."""

    @property
    def metrics_registry(self) -> CollectorRegistry: ...

    @property
    def liveness(self) -> Liveness: ...

    async def start(self) -> None: ...

    async def run(self) -> None: ...

    async def stop(self) -> None: ...


def serve(
    build: Callable[[], Service],
    settings: Settings,
    *,
    metrics_port: int | None = None,
    compute_threads: int | None = None,
) -> None:
    """The whole life of a service process (see the module doc). ``metrics_port`` defaults to
    MAAS_METRICS_PORT (0: no HTTP); ``compute_threads`` caps torch and BLAS once built."""
    configure_logging(settings)
    raise_open_files_limit()
    port = settings.metrics_port if metrics_port is None else metrics_port

    async def main(stop: asyncio.Event) -> None:
        service = build()
        if compute_threads is not None:
            limit_compute_threads(compute_threads)
        await run_service(service, stop, metrics_port=port, metrics_bind=settings.metrics_bind)

    try:
        run_until_signalled(main)
    except MaasError as exc:
        # A refusal on purpose (a setting, the token table, a dependency gone for good): its
        # message says what to fix, and a 45-line traceback around it buried that.
        log.critical("cannot go on: %s: %s", exc.reason_code, exc.message)
        logging.shutdown()
        sys.exit(1)
    exit_stopped()


def exit_stopped() -> None:
    """Let a process whose service stopped end without the interpreter's collection passes over
    every object it ever made: collecting torch's and grpc's module graphs took 2-5 s of CPU on
    a 2-core machine after the service had logged ``stopped`` (0.1-0.9 s without them) — time in
    which `maas stack down`, a rolling restart or a test's teardown waits, and which can run past
    compose's 10 s grace period, recording a clean stop as killed (137). Frozen objects are left
    to the process's end; atexit hooks, thread joins and daemon children's ends still run."""
    gc.freeze()


async def run_service(
    service: Service, stop: asyncio.Event, *, metrics_port: int = 0, metrics_bind: str = "127.0.0.1"
) -> None:
    """Start ``service``, open its HTTP port (if any) once started, run it until ``stop`` is set
    or ``run`` crashes (the error propagates), and always stop it."""
    name = type(service).__name__
    http = None
    failed = True
    watch = asyncio.create_task(service.liveness.watch_loop())
    checks: asyncio.Task[None] | None = None
    try:
        await service.start()
        # Checked once started: before, its clients are not open yet.
        checks = asyncio.create_task(service.liveness.dependencies.watch())
        if metrics_port:
            http = serve_metrics(
                metrics_port, metrics_bind, service.metrics_registry, service.liveness
            )
        log.info("%s running", name)
        await run_until_stopped(service.run(), stop)
        failed = False
        log.info("%s shutting down", name)
    finally:
        watch.cancel()
        if checks is not None:
            checks.cancel()
        if http is not None:
            await asyncio.to_thread(http.shutdown)
            http.server_close()
        try:
            await service.stop()
        except Exception:
            if not failed:
                raise
            # The failure that ended it is the news (it propagates); this one is logged.
            log.exception("%s: stopping after a failure failed too", name)
        await asyncio.wait([watch] if checks is None else [watch, checks])
        log.info("%s stopped", name)
