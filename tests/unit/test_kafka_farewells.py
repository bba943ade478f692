"""Stopping while the broker is away: each farewell to Kafka (a producer's pending sends, a
consumer leaving its group, a member's ``down``, a shard's last statuses) ends within
KAFKA_STOP_S, and a consumer that raises its own fetch's cancellation on close ends nothing.
Fakes stand in for the Kafka clients, which hang or raise there."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from maas import bus
from maas.config import Settings
from maas.training import control
from maas.training.control import Heartbeat, Identity
from services.aggregator import shard_job
from services.aggregator.shard_job import StatusReporter
from tests.unit.pool_kit import held_job

BOUND_S = 0.05
NEVER_S = 5  # a test still waiting by then has found a farewell without a bound


async def forever() -> None:
    await asyncio.Event().wait()


class BrokerAway:
    """An aiokafka client with no broker: start succeeds (it did, earlier), nothing else ends."""

    def __init__(self, **_options: Any) -> None:
        self.cancelled_sends = 0

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        await forever()

    async def send(self, *_args: Any, **_kwargs: Any) -> None:
        try:
            await forever()
        except asyncio.CancelledError:
            self.cancelled_sends += 1
            raise


class FetchCancelledOnClose:
    """aiokafka 0.14's consumer whose fetch was retrying when it closed."""

    async def stop(self) -> None:
        raise asyncio.CancelledError


@pytest.fixture
def short_farewells(monkeypatch: pytest.MonkeyPatch) -> None:
    for module in (bus, control, shard_job):
        monkeypatch.setattr(module, "KAFKA_STOP_S", BOUND_S)


async def test_a_producer_whose_pending_sends_kafka_never_takes_still_stops(
    short_farewells, monkeypatch
) -> None:
    monkeypatch.setattr(bus, "AIOKafkaProducer", BrokerAway)
    producer = bus.EventProducer(Settings())
    await producer.start()
    async with asyncio.timeout(NEVER_S):
        await producer.stop()


async def test_a_consumer_that_cannot_leave_its_group_is_left_behind(short_farewells) -> None:
    async with asyncio.timeout(NEVER_S):
        await bus.stop_consumer(BrokerAway())  # type: ignore[arg-type]


async def test_a_consumer_raising_its_fetchs_cancellation_on_close_stops_quietly() -> None:
    await bus.stop_consumer(FetchCancelledOnClose())  # type: ignore[arg-type]


async def test_a_cancellation_of_the_stopping_task_itself_is_passed_on() -> None:
    stopping = asyncio.create_task(bus.stop_consumer(BrokerAway()))  # type: ignore[arg-type]
    await asyncio.sleep(0)
    stopping.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopping


async def test_a_member_leaves_without_its_down_when_kafka_cannot_take_it(
    short_farewells,
) -> None:
    producer = BrokerAway()
    heartbeat = Heartbeat(producer, Settings(), Identity("w-1", "worker"))  # type: ignore[arg-type]
    async with asyncio.timeout(NEVER_S):
        await heartbeat.leave()
    assert producer.cancelled_sends == 1


async def test_a_shard_stops_without_the_statuses_kafka_cannot_take(short_farewells) -> None:
    producer = BrokerAway()
    reporter = StatusReporter(producer, "aggregator-0")  # type: ignore[arg-type]
    await reporter.hold(held_job(partition=0))
    async with asyncio.timeout(NEVER_S):
        await reporter.drain()
    await asyncio.sleep(0)  # the abandoned send sees its cancellation
    assert producer.cancelled_sends == 1
