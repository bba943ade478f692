"""Kafka offset helpers for tests that must read only what they produce on a shared topic."""

from __future__ import annotations

from aiokafka import AIOKafkaConsumer, TopicPartition

from maas.config import Settings
from maas.topics import Topic


async def end_offsets(settings: Settings, topic: Topic) -> dict[TopicPartition, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap)
    await consumer.start()
    try:
        parts = [TopicPartition(topic.name, p) for p in range(topic.partitions)]
        return await consumer.end_offsets(parts)
    finally:
        await consumer.stop()


async def start_group_at_end(settings: Settings, topic: Topic, group_id: str) -> None:
    """Commit the topic's current end for ``group_id``: its consumers read only what follows
    (earlier tests leave poison records on the shared topics)."""
    ends = await end_offsets(settings, topic)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap, group_id=group_id, enable_auto_commit=False
    )
    await consumer.start()
    try:
        consumer.assign(list(ends))
        await consumer.commit(dict(ends))
    finally:
        await consumer.stop()
