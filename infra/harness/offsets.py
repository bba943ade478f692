"""Where a consumer group stands on the real broker, read from outside the group."""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from maas.config import Settings
from maas.errors import DeadlineExceeded
from maas.topics import Topic


async def wait_committed(settings: Settings, group_id: str, topic: Topic, timeout_s: float) -> None:
    """Wait until ``group_id`` committed every record ``topic`` holds now: then it has handled
    each of them (and nothing it read can produce again). An empty partition has nothing to
    commit."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    await consumer.start()
    try:
        partitions = [TopicPartition(topic.name, p) for p in range(topic.partitions)]
        ends = await consumer.end_offsets(partitions)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            offsets = await admin.list_consumer_group_offsets(group_id, partitions=partitions)
            behind = {
                tp: end
                for tp, end in ends.items()
                if end > 0 and (offsets.get(tp) is None or offsets[tp].offset < end)
            }
            if not behind:
                return
            if loop.time() > deadline:
                raise DeadlineExceeded(f"group {group_id} has not committed {behind} in time")
            await asyncio.sleep(0.2)
    finally:
        await consumer.stop()
        await admin.close()
