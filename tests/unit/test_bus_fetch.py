"""A record the Kafka client cannot parse (aiokafka raises from ``getmany`` on a header key that
is not UTF-8) is handed on as a stand-in that reads as unreadable, the reader moves past it, and
nothing the failed fetch had drained from other partitions is lost. The consumer is a fake that
fails as aiokafka does; tests/fuzz/test_header_keys.py sends such records to a real broker."""

from __future__ import annotations

import pytest
from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.errors import (
    CorruptRecordException,
    KafkaConnectionError,
    UnsupportedCodecError,
)

from maas import events
from maas.bus import decode_value
from maas.bus_fetch import UNREADABLE_HEADER, fetch
from maas.errors import SchemaViolation

A, B, C = (TopicPartition("maas.jobs.v1", p) for p in range(3))
BAD = "bad"
NOT_UTF8 = UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")  # a header key's
VALUE = events.encode(events.new_event(events.JOB_STATUS, job_id="j", state="running"))


def record(tp: TopicPartition, offset: int, headers=()) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(tp.topic, tp.partition, offset, 0, 0, None, VALUE, None, -1, 9, headers)


class Kafka:
    """A consumer over fixed partition logs that fails like aiokafka's fetcher: partitions are
    drained in order, each drained one's position moves on, and a ``BAD`` entry raises — the
    records drained before it are lost with the exception. A partition has no position until
    one is asked for (a fresh group's first fetch); it then starts at ``committed`` or 0."""

    def __init__(
        self,
        logs: dict[TopicPartition, list[str]],
        committed: dict[TopicPartition, int] | None = None,
        failure: Exception = NOT_UTF8,
    ) -> None:
        self.logs = logs
        self.failure = failure
        self.committed_offsets = dict(committed or {})
        self.positions: dict[TopicPartition, int] = {}

    def assignment(self) -> set[TopicPartition]:
        return set(self.logs)

    async def position(self, tp: TopicPartition) -> int:
        return self.positions.setdefault(tp, self.committed_offsets.get(tp, 0))

    async def committed(self, tp: TopicPartition) -> int | None:
        return self.committed_offsets.get(tp)

    async def seek_to_beginning(self, *tps: TopicPartition) -> None:
        for tp in tps:
            self.positions[tp] = 0

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.positions[tp] = offset

    async def getmany(self, *tps: TopicPartition, timeout_ms: int, max_records=None):
        got = {}
        for tp in tps or sorted(self.logs):
            start = await self.position(tp)
            for i, entry in enumerate(self.logs[tp][start:][:max_records]):
                if entry == BAD:
                    raise self.failure
                got.setdefault(tp, []).append(record(tp, start + i))
                self.positions[tp] = start + i + 1
        return got


def offsets(batches) -> dict[TopicPartition, list[int]]:
    return {tp: [r.offset for r in rs] for tp, rs in batches.items()}


async def read_all(kafka: Kafka) -> dict[TopicPartition, list[int]]:
    """Fetch until a fetch comes back empty: every offset handed on, per partition."""
    seen: dict[TopicPartition, list[int]] = {}
    while batches := await fetch(kafka, timeout_ms=0):  # type: ignore[arg-type]
        for tp, got in offsets(batches).items():
            seen.setdefault(tp, []).extend(got)
    return seen


async def test_a_fetch_without_a_bad_record_is_what_the_client_returned() -> None:
    kafka = Kafka({A: ["ok", "ok"], B: ["ok"]})
    got = await fetch(kafka, timeout_ms=0)  # type: ignore[arg-type]
    assert offsets(got) == {A: [0, 1], B: [0]}


async def test_the_records_before_an_unparsable_one_come_back_then_a_stand_in_for_it() -> None:
    kafka = Kafka({A: ["ok"], B: ["ok", BAD, "ok"]})
    got = await fetch(kafka, timeout_ms=0)  # type: ignore[arg-type]
    assert offsets(got) == {A: [0], B: [0, 1]}
    with pytest.raises(SchemaViolation, match="cannot parse this record.*UnicodeDecodeError"):
        decode_value(got[B][1])
    assert kafka.positions[B] == 2  # past it: the next fetch reads on
    assert offsets(await fetch(kafka, timeout_ms=0)) == {B: [2]}  # type: ignore[arg-type]


async def test_a_fresh_group_loses_nothing_the_failed_first_fetch_had_drained() -> None:
    # No partition has a position before the first fetch; A is drained before C fails.
    kafka = Kafka({A: ["ok", "ok"], B: ["ok"], C: ["ok", "ok", BAD, "ok"]})
    assert await read_all(kafka) == {A: [0, 1], B: [0], C: [0, 1, 2, 3]}


async def test_records_before_a_committed_offset_are_not_read_again() -> None:
    kafka = Kafka({A: ["ok", "ok", "ok"], B: ["ok", BAD]}, committed={A: 2})
    assert await read_all(kafka) == {A: [2], B: [0, 1]}


class Joining(Kafka):
    """A fresh group whose partitions are given while its first fetch waits (no position of
    them could be noted before it)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.joined = False

    def assignment(self) -> set[TopicPartition]:
        return super().assignment() if self.joined else set()

    async def seek_to_end(self, *tps: TopicPartition) -> None:
        for tp in tps:
            self.positions[tp] = len(self.logs[tp])

    async def getmany(self, *tps: TopicPartition, timeout_ms: int, max_records=None):
        self.joined = True
        return await super().getmany(*tps, timeout_ms=timeout_ms, max_records=max_records)


async def test_a_partition_given_during_the_failed_fetch_starts_over_where_the_group_left_it():
    kafka = Joining({A: ["ok", "ok", "ok"], B: ["ok"], C: ["ok", BAD]}, committed={A: 1})
    assert await read_all(kafka) == {A: [1, 2], B: [0], C: [0, 1]}


async def test_every_unparsable_record_gets_its_own_stand_in() -> None:
    kafka = Kafka({A: [BAD, BAD, "ok"], B: ["ok", BAD]})
    seen = await read_all(kafka)
    assert seen == {A: [0, 1, 2], B: [0, 1]}


async def test_a_fetched_record_cannot_pass_itself_off_as_a_stand_in() -> None:
    forged = record(A, 0, headers=[(UNREADABLE_HEADER, b"nothing wrong")])
    assert decode_value(forged)["job_id"] == "j"


@pytest.mark.parametrize(
    "failure",
    [
        UnsupportedCodecError("Libraries for zstd compression codec not found"),
        CorruptRecordException("Invalid CRC - maas.jobs.v1-1"),
    ],
)
async def test_a_batch_the_client_cannot_decompress_or_check_gets_stand_ins(failure) -> None:
    kafka = Kafka({A: ["ok"], B: ["ok", BAD, "ok"]}, failure=failure)
    got = await fetch(kafka, timeout_ms=0)  # type: ignore[arg-type]
    assert offsets(got) == {A: [0], B: [0, 1]}
    with pytest.raises(SchemaViolation, match=type(failure).__name__):
        decode_value(got[B][1])
    assert offsets(await fetch(kafka, timeout_ms=0)) == {B: [2]}  # type: ignore[arg-type]


async def test_an_error_of_the_client_itself_is_raised_as_it_is() -> None:
    kafka = Kafka({A: ["ok", BAD]}, failure=KafkaConnectionError("broker gone"))
    with pytest.raises(KafkaConnectionError):
        await fetch(kafka, timeout_ms=0)  # type: ignore[arg-type]
