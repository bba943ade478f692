"""The services' logging (``maas.lifecycle.log_to_stderr``): a Kafka outage's reconnect lines and
asyncio's accept failures when out of files are thinned to one per template and period, and say
how many were held back; other lines pass."""

from __future__ import annotations

import io
import logging
import os
import socket
import subprocess
import sys

import pytest

from maas.lifecycle import LOG_FORMAT, RepeatedLineThrottle, log_to_stderr


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


class Sink:
    """A handler with the throttle (30 s, at most 3 templates), fed records directly: the
    logger tree's levels are the process's (the CLI silences aiokafka), not this test's."""

    def __init__(self, clock: Clock) -> None:
        self.text = io.StringIO()
        self.handler = logging.StreamHandler(self.text)
        self.handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.handler.addFilter(RepeatedLineThrottle(30.0, max_templates=3, clock=clock))

    def log(self, logger: str, msg: str, *args: object, level: int = logging.ERROR) -> None:
        self.handler.handle(logging.LogRecord(logger, level, __file__, 0, msg, args, None))

    def unable_to_connect(self, node: int, logger: str = "aiokafka") -> None:
        self.log(logger, "Unable connect to node with id %s: %s", node, "Connect call failed")

    def lines(self) -> list[str]:
        return self.text.getvalue().splitlines()


@pytest.fixture
def out(clock: Clock) -> Sink:
    return Sink(clock)


def test_a_repeated_template_passes_once_per_period_whatever_its_arguments(
    out: Sink, clock: Clock
) -> None:
    for node in range(500):
        out.unable_to_connect(node)
        clock.now += 0.05  # 25 s in all
    assert out.lines() == ["aiokafka ERROR Unable connect to node with id 0: Connect call failed"]


def test_the_next_one_let_through_says_how_many_were_held_back(out: Sink, clock: Clock) -> None:
    out.unable_to_connect(1)
    for _ in range(1234):
        out.unable_to_connect(1)
    clock.now += 31
    out.unable_to_connect(2)
    out.unable_to_connect(3)
    assert out.lines()[1:] == [
        "aiokafka ERROR Unable connect to node with id 2: Connect call failed"
        " (and 1234 more like it in the last 31 s)"
    ]


def test_each_kafka_logger_and_template_has_its_own_period(out: Sink) -> None:
    out.unable_to_connect(1)
    out.unable_to_connect(1, "aiokafka.conn")
    out.unable_to_connect(1, "aiokafka.consumer.group_coordinator")
    out.log("aiokafka", "Unable to update metadata from %s", [1])
    out.log("aiokafka", "Unable to update metadata from %s", [1])
    assert len(out.lines()) == 4


def test_other_loggers_are_not_throttled(out: Sink) -> None:
    for node in range(3):
        out.unable_to_connect(node, "maas.bus")
        out.unable_to_connect(node, "aiokafkaesque")
    assert len(out.lines()) == 6


def test_the_templates_it_tracks_are_capped() -> None:
    held = RepeatedLineThrottle(max_templates=3, clock=lambda: 0.0)

    def passes(template: str) -> bool:
        return held.filter(logging.makeLogRecord({"name": "aiokafka", "msg": template}))

    assert all(passes(f"template {n}") for n in range(10))
    assert not passes("template 9")  # among the 3 tracked: held back
    assert passes("template 0")  # the stalest were forgotten, so it passes again at once


def test_a_held_back_count_does_not_read_a_percent_in_the_message_as_a_field(
    out: Sink, clock: Clock
) -> None:
    for wait in (0, 0, 30):
        clock.now += wait
        out.log("aiokafka", "%s", "100% of fetches failed", level=logging.WARNING)
    assert out.lines()[1] == (
        "aiokafka WARNING 100% of fetches failed (and 1 more like it in the last 30 s)"
    )


def test_the_services_logging_installs_it_once_on_the_process_handler(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = logging.getLogger()
    handler = logging.StreamHandler(io.StringIO())
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    monkeypatch.setattr(root, "handlers", [handler])  # as if basicConfig had made it
    log_to_stderr("INFO")
    log_to_stderr("INFO")  # a second call (a decode process's parent) adds no second one
    assert [type(f) for f in handler.filters] == [RepeatedLineThrottle]


def test_asyncio_out_of_resource_lines_are_throttled_like_the_kafka_clients(
    out: Sink, clock: Clock
) -> None:
    burst = "socket.accept() out of system resource\nsocket: <asyncio.TransportSocket fd=7>"
    for _ in range(128):
        out.log("asyncio", burst)
    clock.now += 31
    out.log("asyncio", burst)
    assert out.lines() == [
        "asyncio ERROR socket.accept() out of system resource",
        "socket: <asyncio.TransportSocket fd=7>",
        "asyncio ERROR socket.accept() out of system resource",
        "socket: <asyncio.TransportSocket fd=7> (and 127 more like it in the last 31 s)",
    ]


def test_an_asyncio_line_of_its_own_passes(out: Sink) -> None:
    for task in range(3):  # asyncio formats the message itself: each names its task
        out.log("asyncio", f"Task exception was never retrieved\nfuture: <Task name='Task-{task}'>")
    assert len(out.lines()) == 6


# A server process out of file descriptors (both limits 64) while 100 clients wait to connect.
OUT_OF_FILES_SERVER = """
import asyncio, resource
from maas.lifecycle import log_to_stderr
log_to_stderr("INFO")
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

async def main():
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0, backlog=128)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.sleep(3)

asyncio.run(main())
"""


def test_a_process_out_of_files_logs_asyncio_s_accept_failure_once() -> None:
    server = subprocess.Popen(
        [sys.executable, "-c", OUT_OF_FILES_SERVER],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ,
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        clients = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(100)]
        _, stderr = server.communicate(timeout=60)
    finally:
        server.kill()
        server.wait()
    for client in clients:
        client.close()
    assert stderr.count("socket.accept() out of system resource") == 1, stderr[-2000:]
