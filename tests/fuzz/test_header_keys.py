"""A record whose header *key* is not UTF-8, on the real broker. Kafka's protocol says a header
key is a string, but the broker stores whatever bytes a producer sent; aiokafka decodes the key
as strict UTF-8 while it parses the fetched batch, so the error is raised inside ``getmany``,
before the bus sees the record (``read_headers`` never runs).

The rule is the same as for any other hostile record: it is dead-lettered with a reason (its
bytes are out of reach: ``maas.bus_fetch`` hands on a stand-in) and the reader goes on to the
next record. The records a failed fetch had drained from other partitions are not lost either:
every other record of the topic is read exactly once, on a fresh group's first fetch too.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.producer import message_accumulator
from aiokafka.producer import producer as producer_module
from aiokafka.record.default_records import _DefaultRecordBatchBuilderPy
from fuzzing import WAIT_S, consuming, own_topic, read_job_statuses

from maas import events
from maas.bus import DeadLetter, EventProducer, Record
from maas.bus_reader import PartitionReader
from maas.topics import Topic

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


class RawKey(str):
    """A header key that encodes to bytes that are not UTF-8 (what a non-Python producer can
    send); aiokafka's pure-Python batch builder writes what ``encode`` returns."""

    def encode(self, *args: Any, **kwargs: Any) -> bytes:
        return b"\xff\xfe-not-utf8"


async def send_with_raw_header_key(
    settings, topic: str, key: bytes, monkeypatch, partition: int | None = None
) -> None:
    for module in (message_accumulator, producer_module):
        monkeypatch.setattr(module, "DefaultRecordBatchBuilder", _DefaultRecordBatchBuilderPy)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        value = events.encode(events.new_event(events.JOB_STATUS, job_id="x", state="running"))
        await producer.send_and_wait(
            topic, value, key=key, headers=[(RawKey("k"), b"v")], partition=partition
        )
    finally:
        await producer.stop()
        monkeypatch.undo()


def status(job_id: str) -> dict[str, Any]:
    return events.new_event(events.JOB_STATUS, job_id=job_id, state="running")


async def test_a_group_consumer_dead_letters_a_non_utf8_header_key_and_goes_on(stack, monkeypatch):
    settings = stack.settings
    group_id = f"header-key-{uuid.uuid4().hex[:8]}"
    topic = await own_topic(settings)
    key = group_id  # both records on its one partition, the bad one first
    await send_with_raw_header_key(settings, topic.name, key.encode(), monkeypatch)
    handled: list[Record] = []
    letters: list[DeadLetter] = []

    async def handle(record: Record) -> None:
        handled.append(record)

    async def on_dead_letter(letter: DeadLetter) -> None:
        letters.append(letter)

    async with EventProducer(settings, client_id=group_id) as producer:
        await producer.send(topic, status(key), key=key)
        schemas = [events.JOB_STATUS]
        async with consuming(
            settings, producer, topic, group_id, handle, on_dead_letter, schemas
        ) as running:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + WAIT_S
            while not handled and not running.done() and loop.time() < deadline:
                await asyncio.sleep(0.2)
            assert not running.done(), f"the consumer loop ended: {running.exception()!r}"
    assert [r.event["job_id"] for r in handled] == [key]
    assert len(letters) == 1 and letters[0].message


async def test_a_group_less_reader_skips_a_non_utf8_header_key_and_goes_on(stack, monkeypatch):
    settings = stack.settings
    topic = await own_topic(settings)
    reader = PartitionReader(settings, topic, [0], client_id="header-key")
    await reader.start()
    await reader.from_now()
    try:
        key = f"header-key-{uuid.uuid4().hex[:8]}"
        await send_with_raw_header_key(settings, topic.name, b"k", monkeypatch)
        async with EventProducer(settings, client_id=key) as producer:
            member = events.new_event(
                events.MEMBER, member_id=key, kind="worker", state="up", address=""
            )
            await producer.send(topic, member, key=key)
        read: list[str] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT_S
        while key not in read and loop.time() < deadline:
            records = await reader.next_records([events.MEMBER])
            read += [record.event["member_id"] for record in records]
        assert key in read
    finally:
        await reader.stop()


BAD = None  # in a plan: the unparsable record's place
PLAN: dict[int, list[str | None]] = {0: ["a0", "a1"], 1: ["b0", BAD, "b1", BAD, "b2"], 2: ["c0"]}


async def plant(settings, topic: Topic, monkeypatch) -> None:
    """Each partition of ``PLAN``, in order: job statuses by id, ``BAD`` an unparsable record."""
    async with EventProducer(settings, client_id=f"plant-{topic.name}") as producer:
        for partition, entries in PLAN.items():
            for entry in entries:
                if entry is BAD:
                    await send_with_raw_header_key(
                        settings, topic.name, b"bad", monkeypatch, partition=partition
                    )
                else:
                    await producer.send(topic, status(entry), key=entry, partition=partition)


def planned_ids() -> list[str]:
    return sorted(entry for entries in PLAN.values() for entry in entries if entry is not BAD)


def planned_bad() -> list[tuple[int, int]]:
    return [
        (p, offset) for p, entries in PLAN.items() for offset, e in enumerate(entries) if e is BAD
    ]


async def test_a_fresh_group_reads_every_other_record_of_the_topic_exactly_once(stack, monkeypatch):
    settings = stack.settings
    topic = await own_topic(settings, partitions=len(PLAN))
    await plant(settings, topic, monkeypatch)  # before the group exists: its first fetch meets it
    expected = len(planned_ids()) + len(planned_bad())
    handled, letters = await read_job_statuses(settings, topic, expected, linger_s=2.0)
    assert sorted(handled) == planned_ids()
    assert sorted((letter.partition, letter.offset) for letter in letters) == planned_bad()
    assert all("cannot parse this record" in letter.message for letter in letters)


async def test_a_group_less_reader_reads_every_other_record_of_the_topic_exactly_once(
    stack, monkeypatch
):
    settings = stack.settings
    topic = await own_topic(settings, partitions=len(PLAN))
    await plant(settings, topic, monkeypatch)
    reader = PartitionReader(settings, topic, client_id="header-keys-all")
    await reader.start()
    try:
        await reader.from_beginning()
        end = await reader.end_offsets()
        read: list[str] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT_S
        while not await reader.reached(end) and loop.time() < deadline:
            records = await reader.next_records([events.JOB_STATUS])
            read += [record.event["job_id"] for record in records]
        assert await reader.reached(end)
        read += [r.event["job_id"] for r in await reader.next_records([events.JOB_STATUS])]
        assert sorted(read) == planned_ids()
    finally:
        await reader.stop()
