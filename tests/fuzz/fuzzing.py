"""What the fuzzers share: how those that collect examples up front draw them (generation only,
no example database, no deadline and no health checks: the examples then feed real servers),
and a group consumer running for the length of a block."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

from hypothesis import HealthCheck, Phase, settings

from maas.bus import DeadLetter, EventProducer, Record
from maas.bus_consumer import EventConsumer
from maas.config import Settings


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
