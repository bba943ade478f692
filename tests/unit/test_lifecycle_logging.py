"""The services' logging (``maas.lifecycle.log_to_stderr``): a Kafka outage's reconnect lines are
thinned to one per template and period, and say how many were held back; other lines pass."""

from __future__ import annotations

import io
import logging

import pytest

from maas.lifecycle import LOG_FORMAT, KafkaClientThrottle, log_to_stderr


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
        self.handler.addFilter(KafkaClientThrottle(30.0, max_templates=3, clock=clock))

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
    held = KafkaClientThrottle(max_templates=3, clock=lambda: 0.0)

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
    assert [type(f) for f in handler.filters] == [KafkaClientThrottle]
