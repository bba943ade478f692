"""The compressor's health, seen from outside its process: ``/healthz`` on its metrics port says
SERVING while its jobs consumer runs; once the consumer stops for good (here the DLQ refuses
every write, so a poison job can be neither handled nor set aside) it says NOT_SERVING and
why, ``maas_loop_up`` drops to 0, and the process stays up. While its broker is away,
``/readyz`` says so and why, and ``/healthz`` stays SERVING.

A private broker of its own, whose DLQ topic takes records of at most 1 KiB: the shared
session's DLQ stays writable for everyone else.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from infra.bootstrap import ensure_topics, topic_plan
from infra.ephemeral import free_ports
from infra.harness.http import http_get
from infra.kafka import KafkaBroker
from infra.proc import free_port
from infra.stack import PythonService
from maas.bus import EventProducer
from maas.config import Settings
from maas.liveness import HEALTH_PATH, READY_PATH
from maas.topics import DLQ, JOBS

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

DLQ_LIMIT_BYTES = 1024


@pytest.fixture(scope="module")
async def private_broker(
    stack, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[Settings, KafkaBroker]]:
    """A broker whose DLQ refuses every dead letter of a record over ~1 KiB."""
    port, controller_port = free_ports(2)
    settings = stack.settings.replace(
        kafka_bootstrap=f"127.0.0.1:{port}",
        kafka_security_protocol="PLAINTEXT",
        state_dir=str(Path(tmp_path_factory.mktemp("compressor-health"))),
    )
    broker = KafkaBroker.from_settings(settings, controller_port=controller_port, attached=True)
    broker.start(wait=False)  # in this thread: the broker dies with its parent thread
    try:
        await asyncio.to_thread(broker.wait_ready, timeout_s=120)
        small_dlq = {"max.message.bytes": str(DLQ_LIMIT_BYTES)}
        plan = [
            dataclasses.replace(t, configs={**t.configs, **small_dlq}) if t.name == DLQ.name else t
            for t in topic_plan(settings)
        ]
        await ensure_topics(settings, plan)
        yield settings, broker
    finally:
        broker.stop()


@pytest.fixture(scope="module")
def kafka(private_broker: tuple[Settings, KafkaBroker]) -> Settings:
    return private_broker[0]


@pytest.fixture
def compressor(kafka: Settings, tmp_path: Path) -> Iterator[PythonService]:
    port = free_port()
    service = PythonService(
        "compressor",
        "services.compressor",
        "127.0.0.1",
        port,
        tmp_path,
        {
            "MAAS_KAFKA_BOOTSTRAP": kafka.kafka_bootstrap,
            "MAAS_KAFKA_SECURITY_PROTOCOL": "PLAINTEXT",
            "MAAS_METRICS_PORT": str(port),
            "MAAS_DLQ_MAX_ATTEMPTS": "2",
        },
    )
    service.start(timeout_s=120)  # ready once its metrics port answers: it is consuming
    try:
        yield service
    finally:
        service.stop()


async def test_readyz_says_kafka_is_away_while_it_is_and_healthz_stays_serving(
    private_broker, compressor
):
    # The compressor also needs a registry, which this test runs none of: /readyz is read for
    # what it says of Kafka, not for READY.
    _, broker = private_broker
    port = compressor.port
    await until(port, kafka_answers=True)
    await asyncio.to_thread(broker.stop)
    try:
        status, body = await until(port, kafka_answers=False)
        assert status == 503 and body.startswith("NOT_READY: kafka: ")
        assert await asyncio.to_thread(http_get, port, HEALTH_PATH) == (200, "SERVING")
    finally:
        broker.start(wait=False)  # in this thread: the broker dies with its parent thread
        await asyncio.to_thread(broker.wait_ready, timeout_s=120)
    _, body = await until(port, kafka_answers=True)
    assert "kafka:" not in body
    assert compressor.process.alive()


async def until(port: int, *, kafka_answers: bool, timeout_s: float = 120) -> tuple[int, str]:
    """``/readyz`` once ``maas_dependency_up{dependency="kafka"}`` says ``kafka_answers``
    (polled every 0.5 s)."""
    want = f'maas_dependency_up{{dependency="kafka"}} {1.0 if kafka_answers else 0.0}'
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while want not in (await asyncio.to_thread(http_get, port, "/metrics"))[1]:
        assert loop.time() < deadline, f"no {want!r} on /metrics after {timeout_s} s"
        await asyncio.sleep(0.5)
    return await asyncio.to_thread(http_get, port, READY_PATH)


# Runs last: the poison record it leaves on the jobs topic would stop every later compressor.
async def test_healthz_turns_not_serving_with_the_reason_when_the_jobs_consumer_stops(
    kafka, compressor
):
    port = compressor.port
    assert await asyncio.to_thread(http_get, port, HEALTH_PATH) == (200, "SERVING")
    async with EventProducer(kafka, client_id="poisoner") as producer:
        await producer.send_raw(JOBS, b"\xc1" * (2 * DLQ_LIMIT_BYTES), key="poison")

    loop = asyncio.get_running_loop()
    deadline = loop.time() + 90
    while (health := await asyncio.to_thread(http_get, port, HEALTH_PATH))[0] == 200:
        assert loop.time() < deadline, "the compressor never reported its consumer stopped"
        await asyncio.sleep(0.5)
    status, body = health
    assert status == 503
    assert body.startswith("NOT_SERVING: jobs-consumer: ") and DLQ.name in body
    _, metrics = await asyncio.to_thread(http_get, port, "/metrics")
    assert 'maas_loop_up{loop="jobs-consumer"} 0.0' in metrics
    assert compressor.process.alive()  # up, saying why it does no work
