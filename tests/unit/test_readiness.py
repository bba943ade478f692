"""Readiness: a dependency (Kafka, S3) that stops answering makes ``/readyz`` say so and why,
leaves ``/healthz`` alone, and is forgotten once it answers again."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from infra.harness.http import http_get
from infra.proc import free_port
from maas.config import Settings
from maas.errors import MaasError, Unavailable
from maas.liveness import HEALTH_PATH, READY_PATH, Liveness, serve_metrics
from maas.readiness import Dependencies, s3_check


class Broker:
    """A check whose answer the test sets."""

    def __init__(self) -> None:
        self.down: str | None = None

    async def check(self) -> None:
        if self.down is not None:
            raise Unavailable(self.down)


def up(registry: CollectorRegistry, dependency: str) -> float | None:
    return registry.get_sample_value("maas_dependency_up", {"dependency": dependency})


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def kafka() -> Broker:
    return Broker()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def dependencies(kafka: Broker, clock: Clock, registry: CollectorRegistry) -> Dependencies:
    deps = Dependencies(registry, clock=clock)
    deps.add("kafka", kafka.check)
    return deps


async def test_every_dependency_counts_as_answering_before_its_first_check(
    dependencies: Dependencies, registry: CollectorRegistry
) -> None:
    assert dependencies.ready and dependencies.reason is None
    assert up(registry, "kafka") == 1


async def test_one_failed_check_is_not_an_outage(
    dependencies: Dependencies, kafka: Broker, registry: CollectorRegistry
) -> None:
    kafka.down = "Kafka at 127.0.0.1:9092: connection refused"
    await dependencies.check_all()
    assert dependencies.ready
    assert up(registry, "kafka") == 1


async def test_a_dependency_failing_twice_in_a_row_is_away_and_says_why_and_since_when(
    dependencies: Dependencies, kafka: Broker, clock: Clock, registry: CollectorRegistry
) -> None:
    kafka.down = "Kafka at 127.0.0.1:9092: connection refused"
    await dependencies.check_all()
    await dependencies.check_all()
    clock.now += 42
    assert dependencies.reason == "kafka: Kafka at 127.0.0.1:9092: connection refused (for 42 s)"
    assert up(registry, "kafka") == 0


async def test_a_dependency_that_answers_again_is_forgotten_and_the_log_says_so(
    dependencies: Dependencies, kafka: Broker, clock: Clock, registry, caplog
) -> None:
    kafka.down = "refused"
    await dependencies.check_all()
    await dependencies.check_all()
    clock.now += 30
    kafka.down = None
    with caplog.at_level(logging.WARNING, logger="maas.readiness"):
        await dependencies.check_all()
    assert dependencies.ready
    assert up(registry, "kafka") == 1
    assert "kafka answers again, after 30 s away" in caplog.text


async def test_a_check_that_does_not_answer_in_time_fails(registry: CollectorRegistry) -> None:
    deps = Dependencies(registry, timeout_s=0.05, failures_to_down=1)

    async def frozen() -> None:  # a SIGSTOPped S3: the connection is accepted, nothing answers
        await asyncio.sleep(3600)

    deps.add("s3", frozen)
    await deps.check_all()
    assert deps.reason is not None and deps.reason.startswith("s3: no answer in 0 s")


async def test_an_unexpected_error_is_reported_with_its_type(registry: CollectorRegistry) -> None:
    deps = Dependencies(registry, failures_to_down=1)

    async def broken() -> None:
        raise OSError("no route to host")

    deps.add("s3", broken)
    await deps.check_all()
    assert deps.reason is not None and deps.reason.startswith("s3: OSError: no route to host")


async def test_s3_check_names_the_endpoint_nothing_answers_on() -> None:
    endpoint = f"127.0.0.1:{free_port()}"
    check = s3_check(Settings().replace(s3_endpoint=endpoint))
    with pytest.raises(MaasError, match=f"S3 at {endpoint}: .*"):
        await check()


@pytest.fixture
def served(
    dependencies: Dependencies, registry: CollectorRegistry
) -> Iterator[tuple[int, Liveness]]:
    liveness = Liveness(CollectorRegistry())
    liveness.dependencies = dependencies  # the service adds its own; these are the test's
    server = serve_metrics(0, "127.0.0.1", registry, liveness)
    try:
        yield server.server_port, liveness
    finally:
        server.shutdown()
        server.server_close()


async def test_readyz_says_ready_while_every_dependency_answers(served) -> None:
    port, _ = served
    assert await asyncio.to_thread(http_get, port, READY_PATH) == (200, "READY")


async def test_readyz_says_which_dependency_is_away_while_healthz_stays_serving(
    served, dependencies: Dependencies, kafka: Broker
) -> None:
    port, _ = served
    kafka.down = "Kafka at 127.0.0.1:9092: connection refused"
    await dependencies.check_all()
    await dependencies.check_all()
    status, body = await asyncio.to_thread(http_get, port, READY_PATH)
    assert status == 503
    assert body.startswith("NOT_READY: kafka: Kafka at 127.0.0.1:9092: connection refused")
    # Liveness is the process's own: an outage elsewhere is no reason to restart it.
    assert await asyncio.to_thread(http_get, port, HEALTH_PATH) == (200, "SERVING")


async def test_a_service_that_is_not_live_is_not_ready_either(served) -> None:
    port, liveness = served
    liveness.set_condition("training pool", "out of the pool for 60 s")
    status, body = await asyncio.to_thread(http_get, port, READY_PATH)
    assert (status, body) == (503, "NOT_READY: training pool: out of the pool for 60 s")
