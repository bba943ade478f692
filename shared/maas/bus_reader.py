"""Reading chosen partitions of a topic without a consumer group.

A group splits a topic's partitions among its members; some readers must see every record
instead: each aggregator shard and gradient worker reads every training assignment, the
coordinator every job status, ``maas jobs watch`` a job's whole history. ``PartitionReader``
reads from now (``from_now``) or from the beginning (``from_beginning``), decodes and validates
each record with the bus's own step, and skips what cannot be read: a reader without a group
commits nothing and dead-letters nothing (the topic's group consumers do). A record the Kafka
client cannot parse at all (``maas.bus_fetch``) is skipped with a log line naming it.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Iterable

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaConnectionError

from maas.bus import Record, open_consumer, read_record, stop_consumer
from maas.bus_fetch import fetch, unreadable_reason
from maas.config import Settings
from maas.errors import SchemaViolation
from maas.topics import Topic

log = logging.getLogger(__name__)

LOST_BROKER_WAIT_S = 1.0


class PartitionReader:
    """Reads ``partitions`` of ``topic`` (all of them by default) as validated records."""

    def __init__(
        self,
        settings: Settings,
        topic: Topic,
        partitions: Iterable[int] | None = None,
        *,
        client_id: str,
    ) -> None:
        self._settings = settings
        self.topic = topic
        chosen = range(topic.partitions) if partitions is None else partitions
        self.partitions = [TopicPartition(topic.name, p) for p in chosen]
        self._client_id = client_id
        self._consumer: AIOKafkaConsumer | None = None

    async def start(self) -> None:
        """Unavailable, saying what to check, when the broker cannot be reached."""
        if self._consumer is not None:
            return
        self._consumer = await open_consumer(
            self._settings,
            client_id=f"{self._client_id}-{uuid.uuid4().hex[:6]}",
            partitions=self.partitions,
            auto_offset_reset="latest",
            fetch_max_wait_ms=100,
        )

    async def stop(self) -> None:
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            await stop_consumer(consumer)

    async def __aenter__(self) -> PartitionReader:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _require(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            raise RuntimeError("PartitionReader used before start() or after stop()")
        return self._consumer

    async def from_now(self) -> None:
        """Read only what is produced from now on (positions resolved before returning)."""
        consumer = self._require()
        await consumer.seek_to_end(*self.partitions)
        for tp in self.partitions:
            await consumer.position(tp)

    async def from_beginning(self) -> None:
        """Read every record still on the partitions (positions resolved before returning)."""
        consumer = self._require()
        await consumer.seek_to_beginning(*self.partitions)
        for tp in self.partitions:
            await consumer.position(tp)

    async def end_offsets(self) -> dict[TopicPartition, int]:
        """Where each partition ends now: pass it to ``reached`` to know when it was read."""
        return dict(await self._require().end_offsets(self.partitions))

    async def reached(self, end: dict[TopicPartition, int]) -> bool:
        consumer = self._require()
        for tp, offset in end.items():
            if await consumer.position(tp) < offset:
                return False
        return True

    async def next_records(
        self, expected_schemas: Iterable[str], timeout_ms: int = 200
    ) -> list[Record]:
        """The next records that read as one of ``expected_schemas``, waiting up to
        ``timeout_ms`` for some; a lost broker is retried (an empty list meanwhile)."""
        try:
            batches = await fetch(self._require(), timeout_ms)
        except KafkaConnectionError as exc:
            log.warning("%s: lost the broker (%s); retrying", self._client_id, exc)
            await asyncio.sleep(LOST_BROKER_WAIT_S)
            return []
        expected = list(expected_schemas)
        depth = self._settings.event_max_depth
        records = []
        for raws in batches.values():
            for raw in raws:
                try:
                    records.append(read_record(raw, expected, max_depth=depth))
                except SchemaViolation as exc:
                    # Not ours to judge: the topic's group consumers dead-letter it.
                    if unreadable_reason(raw) is not None:
                        log.warning(
                            "%s: skipping %s[%d]@%d: %s",
                            self._client_id,
                            raw.topic,
                            raw.partition,
                            raw.offset,
                            exc.message,
                        )
        return records
