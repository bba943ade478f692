"""What the fuzzers share: how those that collect examples up front draw them (generation only,
no example database, no deadline and no health checks: the examples then feed real servers),
a group consumer running for the length of a block, a topic of a test's own, and a fresh group
reading job statuses planted there."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from hypothesis import HealthCheck, Phase, settings

from maas import events
from maas.bus import DeadLetter, EventProducer, Record
from maas.bus_consumer import EventConsumer
from maas.config import Settings
from maas.topics import Topic

WAIT_S = 60.0  # longest a test waits for the records it planted


def drawing(count: int) -> settings:
    """Settings that draw up to ``count`` fresh examples per run of a ``@given`` function."""
    return settings(
        max_examples=count,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )


@contextlib.asynccontextmanager
async def consuming(
    settings_: Settings,
    producer: EventProducer,
    topic: str,
    group_id: str,
    handle: Callable[[Record], Awaitable[None]],
    on_dead_letter: Callable[[DeadLetter], Awaitable[None]],
    schemas: Sequence[str],
) -> AsyncIterator[asyncio.Task[None]]:
    """An ``EventConsumer`` of ``topic`` started and running; yields its loop's task (done only
    if the loop ended) and stops it on the way out."""
    consumer = EventConsumer(
        settings_,
        topics=[topic],
        group_id=group_id,
        handler=handle,
        producer=producer,
        expected_schemas=list(schemas),
        on_dead_letter=on_dead_letter,
    )
    await consumer.start()
    running = asyncio.create_task(consumer.run())
    try:
        yield running
    finally:
        await consumer.stop()
        await asyncio.gather(running, return_exceptions=True)


async def own_topic(settings_: Settings, partitions: int = 1) -> Topic:
    """A topic of the test's own: a reader of a shared topic from its start would meet the
    records a test plants (each such reader would have to expect them)."""
    topic = Topic(f"fuzz-{uuid.uuid4().hex[:8]}", partitions, "any")
    admin = AIOKafkaAdminClient(bootstrap_servers=settings_.kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic.name, partitions, 1)])
    finally:
        await admin.close()
    return topic


async def read_job_statuses(
    settings_: Settings, topic: Topic, expected: int, *, linger_s: float = 0.0
) -> tuple[list[str], list[DeadLetter]]:
    """A fresh group's consumer over ``topic`` until ``expected`` records were handled (their
    job ids, in order) or dead-lettered, then ``linger_s`` more (a duplicate, if any, has time
    to show). The consumer loop must still run at the end."""
    group_id = f"fuzz-{uuid.uuid4().hex[:8]}"
    handled: list[str] = []
    letters: list[DeadLetter] = []

    async def handle(record: Record) -> None:
        handled.append(record.event["job_id"])

    async def on_dead_letter(letter: DeadLetter) -> None:
        letters.append(letter)

    async with (
        EventProducer(settings_, client_id=group_id) as producer,
        consuming(
            settings_, producer, topic.name, group_id, handle, on_dead_letter, [events.JOB_STATUS]
        ) as running,
    ):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT_S
        while len(handled) + len(letters) < expected and loop.time() < deadline:
            assert not running.done(), f"the consumer loop ended: {running.exception()!r}"
            await asyncio.sleep(0.2)
        await asyncio.sleep(linger_s)
        assert not running.done(), f"the consumer loop ended: {running.exception()!r}"
    return handled, letters
