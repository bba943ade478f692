"""A commit the broker refused is made again before the next batch (the Kafka consumer is a fake
here: what is under test is what the bus does with a failed commit)."""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka import TopicPartition
from aiokafka.errors import KafkaTimeoutError

from maas import bus_consumer
from maas.config import Settings

OWNED = TopicPartition("maas.jobs.v1", 0)
GIVEN_AWAY = TopicPartition("maas.jobs.v1", 1)


class FlakyCommits:
    """Refuses its first ``fail`` commits; records the ones it took."""

    def __init__(self, fail: int) -> None:
        self.fail = fail
        self.committed: list[dict[TopicPartition, int]] = []

    def assignment(self) -> set[TopicPartition]:
        return {OWNED}

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        if self.fail:
            self.fail -= 1
            raise KafkaTimeoutError()
        self.committed.append(offsets)


def consumer() -> bus_consumer.EventConsumer:
    async def handler(_record: Any) -> None:
        pass

    return bus_consumer.EventConsumer(
        Settings(),
        topics=["maas.jobs.v1"],
        group_id="g",
        handler=handler,
        producer=None,  # type: ignore[arg-type]
    )


async def test_a_refused_commit_is_made_again_before_the_next_batch() -> None:
    kafka, events = FlakyCommits(fail=1), consumer()
    await events._commit(kafka, OWNED, 7)  # type: ignore[arg-type]
    assert kafka.committed == []
    await events._commit_again(kafka)  # type: ignore[arg-type]
    assert kafka.committed == [{OWNED: 7}]
    await events._commit_again(kafka)  # type: ignore[arg-type]
    assert kafka.committed == [{OWNED: 7}]  # once: it is no longer owed


async def test_a_partition_given_away_is_not_committed_again() -> None:
    kafka, events = FlakyCommits(fail=1), consumer()
    await events._commit(kafka, GIVEN_AWAY, 3)  # type: ignore[arg-type]
    await events._commit_again(kafka)  # type: ignore[arg-type]
    assert kafka.committed == []


class EndlessCommits(FlakyCommits):
    """A commit that never ends, like aiokafka's retrying one once its client is closed."""

    def __init__(self) -> None:
        super().__init__(fail=0)

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        await asyncio.Event().wait()

    async def stop(self) -> None:
        pass


async def test_a_commit_hanging_when_the_consumer_stops_ends_and_stays_owed() -> None:
    kafka, events = EndlessCommits(), consumer()
    events._consumer = kafka  # type: ignore[assignment]
    commit = asyncio.create_task(events._commit(kafka, OWNED, 5))  # type: ignore[arg-type]
    await asyncio.sleep(0.01)
    await events.stop()
    await asyncio.wait_for(commit, 5)
    assert events._uncommitted == {OWNED: 5}
