"""Kafka (control plane) edges shared by the coordinator, aggregator shards and workers.

``PartitionReader`` reads chosen partitions without a consumer group, from "now": every shard
and worker sees every job status (a consumer group would split them). Records are decoded and
validated with the bus's own step. Gradients and parameters never come this way: they travel
over the training data plane (``maas.training.dataplane``).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Iterable
from typing import Any, TypeAlias

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaConnectionError, KafkaError

from maas import events
from maas.bus import Record, decode_value, to_record
from maas.config import Settings
from maas.errors import Unavailable
from maas.kafka_security import kafka_client_kwargs
from maas.topics import Topic

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

    async def next_batch(self, timeout_ms: int = 100) -> list[RawRecord]:
        try:
            batches = await self._require().getmany(timeout_ms=timeout_ms)
        except KafkaConnectionError as exc:
            log.warning("%s: lost the broker (%s); retrying", self._client_id, exc)
            await asyncio.sleep(1.0)
            return []
        return [r for records in batches.values() for r in records]


def decode(raw: RawRecord, schema: str | list[str]) -> Record:
    """Decode and validate (against ``schema``, or one of several) with the bus's own steps;
    SchemaViolation names what is wrong."""
    return to_record(raw, decode_value(raw), [schema] if isinstance(schema, str) else schema)


def status_event(job_id: str, state: str, *, service: str, **fields: Any) -> dict[str, Any]:
    return events.new_event(
        events.JOB_STATUS, job_id=job_id, state=state, service=service, **fields
    )
