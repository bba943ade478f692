"""The Kafka bus against the real broker: delivery, redelivery, the DLQ and idempotence."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from kafka_offsets import start_group_at_end

from maas import events, topics
from maas.bus import ConsumerDied, EventProducer, Record
from maas.bus_consumer import EventConsumer
from maas.errors import InvalidArgument, Unavailable

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


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
    # From the end: earlier tests (the fuzzers) leave poison on this topic, which would count.
    await start_group_at_end(stack.settings, topics.JOB_STATUS, f"g-{key}")
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


async def retried(
    stack, producer, failure: Callable[[int], Exception | None], **options
) -> tuple[list[int], list[Any]]:
    """Consume one new record with a handler whose n-th call raises ``failure(n)`` (None: it
    passes), until it passed or was dead-lettered: the offsets of the calls, and its letters."""
    key = marker()
    await producer.send(topics.JOB_STATUS, status_event(key), key=key)
    calls: list[int] = []
    letters: list[Any] = []
    done = asyncio.Event()

    async def handler(record: Record) -> None:
        if record.key != key:
            return
        calls.append(record.offset)
        if (error := failure(len(calls))) is not None:
            raise error
        done.set()

    async def on_dead_letter(letter) -> None:
        if letter.key == key:
            letters.append(letter)
            done.set()

    await consume(
        stack,
        producer,
        topics.JOB_STATUS,
        f"g-{key}",
        handler,
        done,
        on_dead_letter=on_dead_letter,
        retry_backoff_ms=10,
        **options,
    )
    return calls, letters


async def test_a_handler_that_keeps_failing_is_dead_lettered_after_max_attempts(stack, producer):
    calls, letters = await retried(
        stack, producer, lambda n: RuntimeError("still broken"), max_attempts=3
    )
    assert len(calls) == 3 and len(set(calls)) == 1
    (letter,) = letters
    assert letter.code == "handler_failed" and "still broken" in letter.message


async def test_a_handler_meeting_an_outage_is_retried_past_max_attempts_until_it_passes(
    stack, producer
):
    # A registry restarting for 20 s failed a compress job: five tries took 15 s.
    def restarting(call: int) -> Exception | None:
        return Unavailable("the registry at 127.0.0.1:1 is restarting") if call <= 4 else None

    calls, letters = await retried(stack, producer, restarting, max_attempts=2, retry_outage_s=30.0)
    assert len(calls) == 5 and len(set(calls)) == 1
    assert letters == []


async def test_a_record_stays_uncommitted_while_the_dlq_is_unreachable(stack, producer):
    """Every dead-letter write fails (the DLQ producer is gone) while the topic stays readable:
    the consumer retries with backoff a bounded number of times, then stops saying why; the
    record was never committed and is read again by the next consumer of the group."""
    key = marker()
    await start_group_at_end(stack.settings, topics.JOB_STATUS, f"g-{key}")
    await producer.send(topics.JOB_STATUS, status_event(key), key=key)
    seen: list[int] = []

    async def refuse(record: Record) -> None:
        if record.key == key:
            seen.append(record.offset)
            raise InvalidArgument("refused: goes to the DLQ")

    settings = stack.settings.replace(dlq_max_attempts=3)
    gone = EventProducer(settings, client_id="dlq-gone")  # never started: every send fails
    consumer = EventConsumer(
        settings,
        topics=[topics.JOB_STATUS],
        group_id=f"g-{key}",
        handler=refuse,
        producer=gone,
        retry_backoff_ms=10,
    )
    await consumer.start()
    try:
        with pytest.raises(ConsumerDied, match=r"3 times in a row.*stays uncommitted"):
            await asyncio.wait_for(consumer.run(), 120)
    finally:
        await consumer.stop()
    assert len(seen) == 3 and len(set(seen)) == 1 and consumer.dead_lettered == 0

    again = asyncio.Event()

    async def handle(record: Record) -> None:
        if record.key == key:
            seen.append(record.offset)
            again.set()

    await consume(stack, producer, topics.JOB_STATUS, f"g-{key}", handle, again)
    assert seen[-1] == seen[0]  # the same offset, delivered again: nothing was lost


async def test_a_record_just_under_the_size_limit_is_dead_lettered_cut_to_fit(stack, producer):
    """Its envelope would be bigger than the record: it is cut, keeping size and sha256, and
    the partition moves on (before, that DLQ write was retried forever)."""
    key = marker()
    limit = stack.settings.kafka_max_message_bytes
    value = msgpack.packb({"schema": 7, "pad": "x" * (limit - 1024)})
    await producer.send_raw(topics.JOB_STATUS, value, key=key)
    await producer.send(topics.JOB_STATUS, status_event(key, step=1), key=key)
    handled: list[int] = []
    done = asyncio.Event()

    async def handle(record: Record) -> None:
        if record.key == key:
            handled.append(record.event["step"])
            done.set()

    await consume(stack, producer, topics.JOB_STATUS, f"g-{key}", handle, done)
    assert handled == [1]

    letters: list[dict] = []
    found = asyncio.Event()

    async def read_dlq(record: Record) -> None:
        if record.key == key:
            letters.append(record.event)
            found.set()

    await consume(stack, producer, topics.DLQ, f"dlq-{key}", read_dlq, found)
    (letter,) = letters
    assert letter["original_truncated"] is True and value.startswith(letter["original"])
    assert letter["original_size"] == len(value)
    assert letter["original_sha256"] == hashlib.sha256(value).hexdigest()
