"""The Kafka bus against the real broker: delivery, redelivery, the DLQ and idempotence."""

from __future__ import annotations

import asyncio
import uuid

import msgpack
import pytest

from maas import events, topics
from maas.bus import EventConsumer, EventProducer, Record

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def status_event(job_id: str, step: int = 0) -> dict:
    return events.new_event(events.JOB_STATUS, job_id=job_id, state="running", step=step)


async def consume(
    stack, producer, topic, group_id, handler, done: asyncio.Event, **options
) -> EventConsumer:
    """Run a consumer of ``topic`` until ``done`` is set (at most a minute), then stop it."""
    consumer = EventConsumer(
        stack.settings,
        topics=[topic],
        group_id=group_id,
        handler=handler,
        producer=producer,
        **options,
    )
    await consumer.start()
    task = asyncio.create_task(consumer.run())
    try:
        await asyncio.wait_for(done.wait(), 60)
    finally:
        await consumer.stop()
        await asyncio.gather(task, return_exceptions=True)
    return consumer


@pytest.fixture
async def producer(stack):
    async with EventProducer(stack.settings, client_id="test-bus") as p:
        yield p


def marker() -> str:
    return f"bus-{uuid.uuid4().hex[:10]}"


async def test_an_event_produced_is_consumed_intact(stack, producer):
    key = marker()
    sent = status_event(key, step=7)
    await producer.send(topics.JOB_STATUS, sent, key=key)
    got: list[Record] = []
    done = asyncio.Event()

    async def handle(record: Record) -> None:
        if record.key == key:
            got.append(record)
            done.set()

    await consume(
        stack,
        producer,
        topics.JOB_STATUS,
        f"g-{key}",
        handle,
        done,
    )
    assert [r.event for r in got] == [sent]


async def test_a_record_whose_handler_fails_is_redelivered_not_committed(stack, producer):
    key = marker()
    await producer.send(topics.JOB_STATUS, status_event(key), key=key)
    offsets: list[int] = []
    done = asyncio.Event()

    async def flaky(record: Record) -> None:
        if record.key != key:
            return
        offsets.append(record.offset)
        if len(offsets) == 1:
            raise RuntimeError("transient failure")
        done.set()

    consumer = await consume(
        stack,
        producer,
        topics.JOB_STATUS,
        f"g-{key}",
        flaky,
        done,
        retry_backoff_ms=10,
    )
    assert len(offsets) == 2 and offsets[0] == offsets[1]
    assert consumer.dead_lettered == 0


async def test_undecodable_record_goes_to_the_dlq_and_the_consumer_keeps_going(stack, producer):
    key = marker()
    garbage = b"\xc1 definitely not msgpack"
    await producer.send_raw(topics.JOB_STATUS, garbage, key=key)
    await producer.send(topics.JOB_STATUS, status_event(key, step=1), key=key)
    handled: list[Record] = []
    letters = []
    done = asyncio.Event()

    async def handle(record: Record) -> None:
        if record.key == key:
            handled.append(record)
            done.set()

    async def on_dead_letter(letter) -> None:
        if letter.key == key:
            letters.append(letter)

    await consume(
        stack,
        producer,
        topics.JOB_STATUS,
        f"g-{key}",
        handle,
        done,
        on_dead_letter=on_dead_letter,
    )
    assert [r.event["step"] for r in handled] == [1]
    assert len(letters) == 1 and letters[0].code == "schema_violation"

    dlq_found = asyncio.Event()
    dlq_events: list[dict] = []

    async def read_dlq(record: Record) -> None:
        if record.key == key:
            dlq_events.append(record.event)
            dlq_found.set()

    await consume(
        stack,
        producer,
        topics.DLQ,
        f"dlq-{key}",
        read_dlq,
        dlq_found,
    )
    (letter,) = dlq_events
    assert letter["original"] == garbage
    assert letter["source_topic"] == topics.JOB_STATUS.name
    assert "msgpack" in letter["reason"]["message"]


async def test_an_invalid_event_is_dead_lettered_with_the_schema_reason(stack, producer):
    key = marker()
    bad = status_event(key)
    bad["state"] = "exploded"
    await producer.send_raw(topics.JOB_STATUS, msgpack.packb(bad), key=key)
    letters = []
    done = asyncio.Event()

    async def on_dead_letter(letter) -> None:
        if letter.key == key:
            letters.append(letter)
            done.set()

    async def ignore(record: Record) -> None:
        return None

    await consume(
        stack,
        producer,
        topics.JOB_STATUS,
        f"g-{key}",
        ignore,
        done,
        on_dead_letter=on_dead_letter,
    )
    assert "state" in letters[0].message and letters[0].event["job_id"] == key


async def test_idempotent_producer_writes_each_event_exactly_once(stack, producer):
    key = marker()
    sent = [status_event(key, step=i) for i in range(300)]
    await producer.send_many(topics.JOB_STATUS, [(key, e) for e in sent])
    seen: list[int] = []
    done = asyncio.Event()

    async def handle(record: Record) -> None:
        if record.key == key:
            seen.append(record.event["step"])
            if len(seen) >= len(sent):
                done.set()

    await consume(
        stack,
        producer,
        topics.JOB_STATUS,
        f"g-{key}",
        handle,
        done,
        max_poll_records=500,
    )
    await asyncio.sleep(0.5)
    assert seen == list(range(300))  # one partition per key: in order, no duplicates
