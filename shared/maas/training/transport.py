"""Kafka edges shared by the gradient workers and aggregator shards.

``PartitionReader`` reads chosen partitions without a consumer group: a shard reads exactly its
gradient partition from the offset its checkpoint names, a worker reads every params partition
from "now". Offsets live in checkpoints, not in Kafka, because that is where the state they
belong to lives. Records are decoded and validated with the bus's own step; one that fails is
dead-lettered with the reason (``dead_letter``), never retried forever.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Iterable, Sequence
from typing import Any, TypeAlias

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaConnectionError, KafkaError

from maas import events
from maas.bus import EventProducer, Record, dead_letter_for, decode_value, to_record
from maas.config import Settings
from maas.errors import Unavailable
from maas.kafka_security import kafka_client_kwargs
from maas.topics import DLQ, Topic

log = logging.getLogger(__name__)

RawRecord: TypeAlias = ConsumerRecord[bytes, bytes]


class PartitionReader:
    def __init__(
        self, settings: Settings, topic: Topic, partitions: Iterable[int], *, client_id: str
    ) -> None:
        self._settings = settings
        self.topic = topic
        self.partitions = [TopicPartition(topic.name, p) for p in partitions]
        self._client_id = client_id
        self._consumer: AIOKafkaConsumer | None = None

    async def start(self) -> None:
        if self._consumer is not None:
            return
        limit = self._settings.kafka_max_message_bytes
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self._settings.kafka_bootstrap,
            **kafka_client_kwargs(self._settings),
            group_id=None,
            client_id=f"{self._client_id}-{uuid.uuid4().hex[:6]}",
            enable_auto_commit=False,
            auto_offset_reset="latest",
            max_partition_fetch_bytes=limit,
            fetch_max_bytes=max(52_428_800, limit),
            fetch_max_wait_ms=100,
        )
        try:
            await consumer.start()
        except KafkaError as exc:
            await consumer.stop()
            raise Unavailable(
                f"cannot reach Kafka at {self._settings.kafka_bootstrap}: {exc}"
            ) from exc
        consumer.assign(self.partitions)
        self._consumer = consumer

    async def stop(self) -> None:
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            await consumer.stop()

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

    def seek(self, partition: int, offset: int) -> None:
        self._require().seek(TopicPartition(self.topic.name, partition), offset)

    async def offset_at(self, partition: int, ts_ms: int) -> int | None:
        """The first offset at or after ``ts_ms``, or None if nothing was written since."""
        tp = TopicPartition(self.topic.name, partition)
        found = await self._require().offsets_for_times({tp: ts_ms})
        hit = found.get(tp)
        return None if hit is None else int(hit.offset)

    async def next_batch(self, timeout_ms: int = 100) -> list[RawRecord]:
        try:
            batches = await self._require().getmany(timeout_ms=timeout_ms)
        except KafkaConnectionError as exc:
            log.warning("%s: lost the broker (%s); retrying", self._client_id, exc)
            await asyncio.sleep(1.0)
            return []
        return [r for records in batches.values() for r in records]


def decode(raw: RawRecord, schema: str) -> Record:
    """Decode and validate with the bus's own steps; SchemaViolation names what is wrong."""
    return to_record(raw, decode_value(raw), [schema])


async def dead_letter(
    producer: EventProducer, raw: RawRecord, error: BaseException, reader: str
) -> None:
    letter = dead_letter_for(raw, error, None)
    log.error("dead-lettering %s[%d]@%d: %s", raw.topic, raw.partition, raw.offset, letter.message)
    await producer.send(DLQ, letter.to_event(reader), key=letter.key)


async def send_all(
    producer: EventProducer,
    topic: Topic,
    items: Sequence[tuple[str, int, dict[str, Any]]],
) -> None:
    """Send ``(key, partition, event)`` items concurrently and wait for every ack.

    Every event is validated and encoded here, before the first await: the caller may change
    the arrays an event views (a shard's parameters) as soon as this coroutine first yields.
    """
    encoded = []
    for key, part, event in items:
        events.validate(event)
        encoded.append((key, part, events.encode(event)))
    await asyncio.gather(
        *(producer.send_raw(topic, value, key=key, partition=part) for key, part, value in encoded)
    )


def status_event(job_id: str, state: str, *, service: str, **fields: Any) -> dict[str, Any]:
    return events.new_event(
        events.JOB_STATUS, job_id=job_id, state=state, service=service, **fields
    )
