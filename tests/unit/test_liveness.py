"""Liveness: a background loop that dies is reported (gauge, reason, health hook), not hidden."""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from infra.harness.http import http_get
from infra.proc import free_port
from maas import liveness
from maas.bus import ConsumerDied
from maas.liveness import Liveness, serve_metrics


def up(registry: CollectorRegistry, loop: str) -> float | None:
    return registry.get_sample_value("maas_loop_up", {"loop": loop})


async def test_a_loop_that_dies_turns_the_gauge_off_and_tells_the_health_hook_why():
    registry = CollectorRegistry()
    told: list[str | None] = []

    async def health(why: str | None) -> None:
        told.append(why)

    liveness = Liveness(registry, on_change=health)
    started = asyncio.Event()

    async def consumer() -> None:
        started.set()
        await asyncio.sleep(0)
        raise ConsumerDied("could not write to maas.dlq.v1 8 times in a row")

    task = asyncio.create_task(liveness.supervise("jobs-consumer", consumer()))
    await started.wait()
    async with asyncio.timeout(10):
        while not told:
            await asyncio.sleep(0.01)
    assert up(registry, "jobs-consumer") == 0
    assert told == ["jobs-consumer: could not write to maas.dlq.v1 8 times in a row"]
    assert not liveness.healthy and not task.done()  # the process stays up, saying why
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_loop_that_is_stopped_is_not_a_failure():
    registry = CollectorRegistry()
    liveness = Liveness(registry)

    async def consumer() -> None:
        return None

    await liveness.supervise("models-consumer", consumer())
    assert liveness.healthy and liveness.reason is None
    assert up(registry, "models-consumer") == 1


async def test_an_unexpected_exception_is_reported_with_its_type():
    liveness = Liveness()

    async def relay() -> None:
        raise KeyError("outbox")

    task = asyncio.create_task(liveness.supervise("outbox-relay", relay()))
    async with asyncio.timeout(10):
        while liveness.healthy:
            await asyncio.sleep(0.01)
    assert liveness.reason == "outbox-relay: KeyError: 'outbox'"
    task.cancel()


async def test_a_stalled_event_loop_is_unhealthy_until_it_runs_again():
    liveness = Liveness(stall_after_s=0.3)
    watch = asyncio.create_task(liveness.watch_loop(period_s=0.05))
    await asyncio.sleep(0.1)
    seen: list[tuple[bool, str | None]] = []

    def look_from_another_thread() -> None:  # as /healthz does
        time.sleep(0.5)
        seen.append((liveness.healthy, liveness.reason))

    looking = threading.Thread(target=look_from_another_thread)
    looking.start()
    time.sleep(0.8)  # the loop held, as a long request on it holds it
    looking.join()
    await asyncio.sleep(0.1)
    assert not seen[0][0]
    assert re.fullmatch(r"the event loop has not run for \d+ s \(a request .*\)", str(seen[0][1]))
    assert liveness.healthy and liveness.reason is None
    watch.cancel()


@pytest.fixture
def metrics_port(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    monkeypatch.setattr(liveness, "MAX_METRICS_CONNECTIONS", 2)
    monkeypatch.setattr(liveness, "METRICS_IDLE_TIMEOUT_S", 0.5)
    registry = CollectorRegistry()
    port = free_port()
    server = serve_metrics(port, "127.0.0.1", registry, Liveness(registry))
    yield port
    server.shutdown()
    server.server_close()


def closed_by_server(connection: socket.socket) -> bool:
    connection.settimeout(5)
    try:
        return connection.recv(1) == b""
    except (TimeoutError, ConnectionResetError):
        return False


def test_a_silent_metrics_connection_is_closed_after_the_idle_timeout(metrics_port: int) -> None:
    with socket.create_connection(("127.0.0.1", metrics_port)) as silent:
        silent.sendall(b"GET /healthz HTTP/1.1\r\n")  # half a request, then nothing
        assert closed_by_server(silent)


def test_metrics_connections_past_the_most_at_once_are_closed_unanswered(metrics_port: int) -> None:
    held = [socket.create_connection(("127.0.0.1", metrics_port)) for _ in range(2)]
    try:
        with socket.create_connection(("127.0.0.1", metrics_port)) as third:
            third.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
            assert closed_by_server(third)
    finally:
        for connection in held:
            connection.close()
    assert answered_once_free(metrics_port) == (200, "SERVING")


def answered_once_free(port: int) -> tuple[int, str]:
    """/healthz, asked again until the server has seen the held connections close (its
    connection threads notice a close at their next read: a moment after the client's)."""
    deadline = time.monotonic() + 10
    while True:
        try:
            return http_get(port, "/healthz")
        except ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_the_metrics_are_served_at_metrics(metrics_port: int) -> None:
    status, body = http_get(metrics_port, "/metrics")
    assert status == 200
    assert "# TYPE maas_loop_up gauge" in body


def test_any_other_path_is_not_found_naming_the_ones_served(metrics_port: int) -> None:
    status, body = http_get(metrics_port, "/favicon.ico")
    assert (status, body) == (404, "not found: this port serves /metrics, /healthz and /readyz\n")
