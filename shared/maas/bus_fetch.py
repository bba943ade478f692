"""Fetching that survives a record the Kafka client cannot parse.

aiokafka decodes a header key as strict UTF-8 while it reads a fetched batch. Kafka stores
whatever bytes a producer sent, so a key of other bytes makes ``getmany`` raise before the bus
sees the record — on every fetch of that partition, since the position never moves past it —
and the records it had already drained from other partitions for that call are gone with the
exception (their positions moved on).

``fetch`` is one plain ``getmany`` when nothing fails. It notes each assigned partition's
position first; when the client's parser fails, every partition goes back to where it stood
(one the note lacks, say the first fetch after the group gave it, to its committed offset or
the reset policy), then the partitions are read one record at a time, in turns, up to the
record that fails. That record is handed on as a stand-in with no value, marked
``UNREADABLE_SIZE`` and carrying the error: ``maas.bus.decode_value`` refuses it with that
reason, so group consumers dead-letter it and group-less readers skip it like any other record
that cannot be read. The position moves past it; its bytes stay out of reach.

Two of the client's own errors are about a record's bytes too, not about the client: a batch
compressed with a codec whose library is missing (``UnsupportedCodecError``; the platform ships
cramjam, so gzip, snappy, lz4 and zstd are all read) and a batch whose CRC does not match
(``CorruptRecordException``). They take the same path: each record of such a batch gets a
stand-in, one at a time, and the reader goes on after the batch. Any other error of the client
is raised as it is.

The stand-in's offset is the reader's position when the parser failed: the unreadable record's
own offset, unless transaction markers (which no reader sees) lie just before it, in which case
each marker's offset also gets a stand-in. Nothing is skipped either way.

``Fetcher`` wraps ``fetch`` for the consumer loops (``maas.bus_consumer``,
``maas.bus_transactions``): a lost broker is waited out with a growing backoff, a fatal error of
the client ends the loop as ``ConsumerDied``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import (
    ConsumerStoppedError,
    CorruptRecordException,
    IllegalOperation,
    IllegalStateError,
    KafkaError,
    UnsupportedCodecError,
)

from maas.errors import ConsumerDied

log = logging.getLogger(__name__)

MAX_POLL_BACKOFF_S = 5.0

Batches = dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]

UNREADABLE_SIZE = -2  # a stand-in's serialized_value_size: no record fetched from Kafka has it
UNREADABLE_HEADER = "maas-unreadable"  # a stand-in's one header: why the record is unreadable
PROBE_TIMEOUT_MS = 500  # per partition and turn, while a fetch is read a record at a time
PROBE_LIMIT = 100  # records read a record at a time before the fetch returns what it has

RECORD_ERRORS = (UnsupportedCodecError, CorruptRecordException)  # the client's, about the bytes


def client_error(exc: Exception) -> bool:
    """An error of the client itself (raised as it is), not one about a record's bytes."""
    return isinstance(exc, KafkaError | ConsumerStoppedError) and not isinstance(exc, RECORD_ERRORS)


async def fetch(
    consumer: AIOKafkaConsumer,
    timeout_ms: int,
    *,
    max_records: int | None = None,
    reset: str = "earliest",
) -> Batches:
    """``consumer.getmany``, with a record the client cannot parse replaced by a stand-in.

    ``reset`` is the consumer's ``auto_offset_reset``: where a partition without a committed
    offset starts when the group gave it during the failed fetch."""
    before = await positions(consumer, timeout_ms)
    try:
        return await consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)
    except Exception as exc:
        if client_error(exc):
            raise
        # The client's parser failed on a record's bytes.
        log.warning("a fetch could not be parsed (%r); reading it a record at a time", exc)
        await rewind(consumer, before, reset)
        return await one_at_a_time(consumer, max_records or PROBE_LIMIT)


async def positions(consumer: AIOKafkaConsumer, timeout_ms: int) -> dict[TopicPartition, int]:
    """Each assigned partition's position (one still being resolved is waited for, at most
    ``timeout_ms`` for all); a partition missing from the answer is placed by ``rewind``."""
    got: dict[TopicPartition, int] = {}
    try:
        async with asyncio.timeout(timeout_ms / 1000):
            for tp in consumer.assignment():
                got[tp] = await consumer.position(tp)
    except (TimeoutError, IllegalStateError):  # not resolved in time, or given away meanwhile
        pass
    return got


async def rewind(consumer: AIOKafkaConsumer, before: dict[TopicPartition, int], reset: str) -> None:
    """Every assigned partition back to where the failed fetch found it."""
    for tp in consumer.assignment():
        try:
            if tp in before:
                consumer.seek(tp, before[tp])
            else:
                await start_over(consumer, tp, reset)
        except IllegalStateError:
            continue  # given away meanwhile: its next owner starts from the committed offset


async def start_over(consumer: AIOKafkaConsumer, tp: TopicPartition, reset: str) -> None:
    """Where a group member starts a partition it was just given: the committed offset, else
    the reset policy."""
    try:
        committed = await consumer.committed(tp)
    except IllegalOperation:  # no group: a reader's partitions were all noted before the fetch
        log.warning("%s had no position before a failed fetch; it reads on from here", tp)
        return
    if committed is not None:
        consumer.seek(tp, committed)
    elif reset == "latest":
        await consumer.seek_to_end(tp)
    else:
        await consumer.seek_to_beginning(tp)


async def one_at_a_time(consumer: AIOKafkaConsumer, limit: int) -> Batches:
    """The assigned partitions a record at a time, in turns (a busy partition cannot starve
    the one that fails), up to the first record that fails or ``limit`` records."""
    got: Batches = {}
    pending = sorted(consumer.assignment())
    while pending and limit > 0:
        for tp in list(pending):
            try:
                start = await consumer.position(tp)
                batch = await consumer.getmany(tp, timeout_ms=PROBE_TIMEOUT_MS, max_records=1)
            except IllegalStateError:
                pending.remove(tp)  # given away meanwhile
                continue
            except Exception as exc:
                if client_error(exc):
                    raise
                consumer.seek(tp, start + 1)
                got.setdefault(tp, []).append(stand_in(tp, start, exc))
                return got
            if not batch.get(tp):
                pending.remove(tp)  # read to its end
                continue
            got.setdefault(tp, []).extend(batch[tp])
            limit -= len(batch[tp])
            if limit <= 0:
                break
    return got


def stand_in(tp: TopicPartition, offset: int, error: Exception) -> ConsumerRecord[bytes, bytes]:
    """The record at ``tp``@``offset`` as far as it can be known: where it is, and why not more."""
    reason = f"the Kafka client cannot parse this record ({type(error).__name__}: {error})"
    return ConsumerRecord(
        topic=tp.topic,
        partition=tp.partition,
        offset=offset,
        timestamp=-1,
        timestamp_type=0,
        key=None,
        value=None,
        checksum=None,
        serialized_key_size=-1,
        serialized_value_size=UNREADABLE_SIZE,
        headers=[(UNREADABLE_HEADER, reason.encode())],
    )


def unreadable_reason(raw: ConsumerRecord[bytes, bytes]) -> str | None:
    """Why a stand-in's record could not be read; None for a record fetched from Kafka."""
    if raw.serialized_value_size != UNREADABLE_SIZE:
        return None
    return dict(raw.headers).get(UNREADABLE_HEADER, b"").decode(errors="replace")


class Fetcher:
    """Fetches for a consumer loop. ``next`` is None when nothing was fetched: the consumer was
    stopped under the loop, or the broker was lost (waited out with a growing backoff through
    ``pause``, which wakes early on stop). An error Kafka calls fatal is ConsumerDied. A record
    the client cannot parse comes as a stand-in that reads as unreadable (``fetch``, above);
    ``reset`` is the consumer's ``auto_offset_reset``."""

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        name: str,
        pause: Callable[[float], Awaitable[None]],
        reset: str = "earliest",
    ) -> None:
        self._consumer = consumer
        self._name = name
        self._pause = pause
        self._reset = reset
        self._lost = 0

    async def next(self, timeout_ms: int = 200) -> Batches | None:
        try:
            batches = await fetch(self._consumer, timeout_ms, reset=self._reset)
        except ConsumerStoppedError:
            return None
        except KafkaError as exc:
            if not exc.retriable:
                raise ConsumerDied(f"consumer {self._name} cannot fetch: {exc!r}") from exc
            self._lost += 1
            log.warning("consumer %s lost the broker (%s); retrying", self._name, exc)
            await self._pause(min(0.5 * self._lost, MAX_POLL_BACKOFF_S))
            return None
        self._lost = 0
        return batches
