"""The one consumer factory (``maas.bus.open_consumer``): what every consumer is made with, and
the error a broker that cannot be reached becomes (the Kafka client is a fake here: what is
under test is what the bus asks of it)."""

from __future__ import annotations

from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaConnectionError

from maas import bus
from maas.bus_consumer import EventConsumer
from maas.bus_reader import PartitionReader
from maas.config import Settings
from maas.errors import Unavailable
from maas.topics import JOB_STATUS


class FakeConsumer:
    """Records how it was made, subscribed or assigned; ``refuse`` makes its start fail."""

    made: list[FakeConsumer] = []
    refuse = False

    def __init__(self, **options: Any) -> None:
        self.options = options
        self.subscribed: list[str] = []
        self.assigned: list[TopicPartition] = []
        self.stopped = False
        FakeConsumer.made.append(self)

    def subscribe(self, topics: list[str], listener: Any = None) -> None:
        self.subscribed = topics

    def assign(self, partitions: list[TopicPartition]) -> None:
        self.assigned = partitions

    async def start(self) -> None:
        if FakeConsumer.refuse:
            raise KafkaConnectionError("no broker")

    async def stop(self) -> None:
        self.stopped = True


@pytest.fixture(autouse=True)
def fake_kafka(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeConsumer.made, FakeConsumer.refuse = [], False
    monkeypatch.setattr(bus, "AIOKafkaConsumer", FakeConsumer)


def group_consumer(**options: Any) -> EventConsumer:
    async def handler(_record: Any) -> None:
        pass

    return EventConsumer(
        Settings(kafka_max_message_bytes=8 << 20),
        topics=["maas.jobs.v1"],
        group_id="g",
        handler=handler,
        producer=None,  # type: ignore[arg-type]
        **options,
    )


async def test_a_group_consumer_commits_by_hand_and_fetches_messages_up_to_the_limit() -> None:
    await group_consumer().start()
    [made] = FakeConsumer.made
    assert made.subscribed == ["maas.jobs.v1"] and made.options["group_id"] == "g"
    assert made.options["enable_auto_commit"] is False
    assert made.options["max_partition_fetch_bytes"] == 8 << 20
    assert "max_poll_interval_ms" not in made.options  # Kafka's default unless asked


async def test_a_long_handler_gets_the_poll_interval_it_asks_for() -> None:
    await group_consumer(max_poll_interval_ms=3_600_000).start()
    assert FakeConsumer.made[0].options["max_poll_interval_ms"] == 3_600_000


async def test_a_partition_reader_is_assigned_its_partitions_without_a_group() -> None:
    await PartitionReader(Settings(), JOB_STATUS, [0, 2], client_id="r").start()
    [made] = FakeConsumer.made
    assert made.options["group_id"] is None and not made.subscribed
    assert made.assigned == [TopicPartition(JOB_STATUS.name, 0), TopicPartition(JOB_STATUS.name, 2)]


async def test_a_consumer_that_cannot_start_is_stopped_and_says_what_to_check() -> None:
    FakeConsumer.refuse = True
    with pytest.raises(Unavailable, match=r"cannot reach Kafka at 127\.0\.0\.1:1: .*maas stack"):
        await bus.open_consumer(Settings(kafka_bootstrap="127.0.0.1:1"), client_id="c")
    assert FakeConsumer.made[0].stopped
