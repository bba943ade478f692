"""Exactly-once consume-transform-produce on Kafka: each record's outputs and its offset commit
land in one transaction, so a crash at any point leaves either both or neither.

Records are read with ``isolation_level=read_committed`` and decoded like every bus record
(``maas.bus``); ``transform`` turns one record into the records to write. Per partition batch,
the outputs of the records handled, the dead letters of the refused ones (``maas.dlq.v1``, the
bus's ``DeadLetter``) and the offset after the last of them go into one transaction of that
partition's producer. The producer's ``transactional_id`` is ``<group>.<topic>.<partition>``:
whichever process owns a partition writes under the same id, so a new owner fences the old one
(a process killed mid-transaction included: what it left open is aborted, or completed if it was
committing) before it reads the committed offset — and a reader with ``read_committed`` sees
each output once.

A record ``transform`` refuses for good (a non-retriable ``MaasError``), an undecodable one, or
one whose output names a topic the broker lacks (``maas.known_topics``) is dead-lettered with the
reason; another failure is retried with backoff (the partition is read again from that record; the
records before it commit) and dead-lettered after ``max_attempts`` (a look-up of the output topics
that the broker failed is not the record's fault, and is not counted). A transaction that fails
(broker lost, fenced, an ack lost, or not done within ``TRANSACTION_TIMEOUT_S``) drops its
producer without waiting for an abort; the partition is then taken over afresh (the new producer
fences the old one and aborts what it left open) and read from its committed offset. When the
broker refused one of a record's outputs for good (over the topic's ``max.message.bytes``, a
topic the service may not write), that record is dead-lettered on the next round with the
broker's reason, and the output topics of a failed transaction are looked up again (one deleted
since it was written once is then missing, and its records are dead-lettered). So no record
holds its partition for ever. Nothing ends the loop but ``stop()`` or a fetch error Kafka calls
fatal.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import (
    InvalidTopicError,
    KafkaError,
    MessageSizeTooLargeError,
    ProducerFenced,
    RecordListTooLargeError,
    TopicAuthorizationFailedError,
)

from maas import events
from maas.bus import (
    Record,
    dead_letter_for,
    decode_value,
    is_poison,
    open_consumer,
    producer_options,
    stop_consumer,
    to_record,
    unreadable,
)
from maas.bus_fetch import MAX_POLL_BACKOFF_S, Fetcher
from maas.config import Settings
from maas.deadletter import DeadLetter, Headers
from maas.errors import FailedPrecondition
from maas.known_topics import KnownTopics
from maas.topics import DLQ
from maas.waiting import set_within

log = logging.getLogger(__name__)

PRODUCER_STOP_S = 10.0
# A transaction takes milliseconds; one still open after this waits on something that will not
# come (a send to a topic deleted under the producer's cached metadata is retried without end).
TRANSACTION_TIMEOUT_S = 15.0
# What the broker answers about one record's bytes or topic, never about the producer: the
# record whose output it is can never be written.
REFUSED_OUTPUT = (
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    TopicAuthorizationFailedError,
    InvalidTopicError,
)


@dataclass(frozen=True)
class Output:
    """One record to write, in the same transaction as the offset of the record it answers."""

    topic: str
    value: bytes
    key: str | None = None
    headers: Headers = field(default_factory=list)


@dataclass(frozen=True)
class Committed:
    """What one transaction wrote: records consumed, outputs produced, records dead-lettered."""

    records: int
    produced: int
    dead_lettered: int


@dataclass(frozen=True)
class Retry:
    error: BaseException


class Refused(Exception):
    """The broker refused an output of the record at ``offset`` for good."""

    def __init__(self, offset: int, topic: str, error: BaseException) -> None:
        super().__init__(f"{topic}: {error!r}")
        self.offset = offset
        self.error = FailedPrecondition(
            f"the broker refused this record's output to {events.clip(topic, 250)!r} "
            f"({type(error).__name__}: {error}); the record cannot be answered there"
        )


Transform = Callable[[Record], Awaitable[Sequence[Output]]]
CommitHook = Callable[[Committed], None]
_Outcome = Sequence[Output] | DeadLetter | Retry


def transactional_id(group_id: str, tp: TopicPartition) -> str:
    """The id every owner of ``tp`` writes under, so the newest owner fences the others."""
    return f"{group_id}.{tp.topic}.{tp.partition}"


def committable(outcomes: Sequence[_Outcome]) -> int:
    """How many outcomes, from the first, can commit: those before the first retry."""
    for i, outcome in enumerate(outcomes):
        if isinstance(outcome, Retry):
            return i
    return len(outcomes)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, pipe: TransactionalPipe) -> None:
        self._pipe = pipe

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self._pipe._release(set(revoked))

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        self._pipe._unsynced |= set(assigned)


class TransactionalPipe:
    """Consume ``topics`` in ``group_id``, ``transform`` each record, write exactly once."""

    def __init__(
        self,
        settings: Settings,
        *,
        topics: Sequence[str],
        group_id: str,
        transform: Transform,
        expected_schemas: Iterable[str] | None = None,
        on_commit: CommitHook | None = None,
        max_attempts: int = 8,
        retry_backoff_ms: int = 200,
        max_poll_records: int = 256,
    ) -> None:
        self._settings = settings
        self._topics = list(topics)
        self.group_id = group_id
        self._transform = transform
        self._expected = list(expected_schemas) if expected_schemas is not None else None
        self._on_commit = on_commit
        self._max_attempts = max_attempts
        self._retry_backoff_ms = retry_backoff_ms
        self._max_poll_records = max_poll_records
        self._consumer: AIOKafkaConsumer | None = None
        self._producers: dict[TopicPartition, AIOKafkaProducer] = {}
        # Assigned partitions whose position must be read again once their producer fenced
        # every earlier owner (only then is the committed offset final).
        self._unsynced: set[TopicPartition] = set()
        self._attempts: dict[tuple[str, int, int], int] = {}
        self._refused: dict[tuple[str, int, int], FailedPrecondition] = {}
        self._known_topics = KnownTopics(lambda: self._require().topics())
        self._lock = asyncio.Lock()  # a round of transactions, or a revocation
        self._stopping = asyncio.Event()

    async def start(self) -> None:
        if self._consumer is not None:
            return
        consumer = await open_consumer(
            self._settings,
            topics=self._topics,
            listener=_Rebalance(self),
            group_id=self.group_id,
            client_id=self.group_id,
            isolation_level="read_committed",
            max_poll_records=self._max_poll_records,
        )
        self._consumer = consumer

    async def stop(self) -> None:
        """Finish the transaction in progress, then leave the group."""
        self._stopping.set()
        # The round in progress may open a producer while a release waits for it to end: one
        # started just before a stop was left open ("Unclosed AIOKafkaProducer" at exit).
        while self._producers:
            await self._release(set(self._producers))
        # Not under the lock: leaving the group may wait for a revocation, which takes it.
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            await stop_consumer(consumer)

    def _require(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            raise RuntimeError("TransactionalPipe used before start() or after stop()")
        return self._consumer

    async def run(self) -> None:
        """Consume until ``stop()``; ConsumerDied when Kafka refuses the fetch for good."""
        consumer = self._require()
        fetcher = Fetcher(consumer, self.group_id, self._pause)
        while not self._stopping.is_set():
            batches = await fetcher.next()
            if batches is None:
                continue  # stopped, or the broker lost (waited out)
            async with self._lock:
                if self._stopping.is_set():
                    return
                stale = set(self._unsynced)  # fetched from a position not yet read again
                await self._sync(consumer)
                rounds = [
                    self._process(consumer, tp, raws)
                    for tp, raws in batches.items()
                    if tp in consumer.assignment() and tp not in stale
                ]
                await asyncio.gather(*rounds)

    async def _pause(self, seconds: float) -> None:
        await set_within(self._stopping, seconds)

    # --- partitions and their producers -----------------------------------------------------

    async def _sync(self, consumer: AIOKafkaConsumer) -> None:
        """Newly assigned partitions: fence earlier owners, then seek to the committed offset
        (records fetched before that are dropped: they may start at a stale position)."""
        for tp in sorted(self._unsynced & consumer.assignment()):
            try:
                await self._producer(tp)
                committed = await consumer.committed(tp)
            except KafkaError as exc:
                log.warning("cannot take over %s yet (%s); retrying", tp, exc)
                continue
            if committed is None:
                await consumer.seek_to_beginning(tp)
            else:
                consumer.seek(tp, committed)
            self._unsynced.discard(tp)
        self._unsynced &= consumer.assignment()

    async def _producer(self, tp: TopicPartition) -> AIOKafkaProducer:
        producer = self._producers.get(tp)
        if producer is None:
            name = transactional_id(self.group_id, tp)
            producer = AIOKafkaProducer(
                **producer_options(self._settings, name), transactional_id=name
            )
            try:
                await producer.start()
                # The producer id comes with the first transaction: only then are earlier owners
                # fenced and what they left open finished (committed or aborted). An empty
                # transaction asks for it and ends without a round trip.
                await producer.begin_transaction()
                await producer.abort_transaction()
            except BaseException:
                await producer.stop()
                raise
            self._producers[tp] = producer
        return producer

    async def _release(self, partitions: set[TopicPartition]) -> None:
        """Once the round in progress is done, stop the producers of ``partitions`` (revoked:
        the next owner takes over)."""
        async with self._lock:
            self._unsynced -= partitions
            for where in [w for w in self._refused if TopicPartition(w[0], w[1]) in partitions]:
                del self._refused[where]  # the next owner finds out for itself
            for tp in partitions:
                await self._drop_producer(tp)

    async def _drop_producer(self, tp: TopicPartition) -> None:
        producer = self._producers.pop(tp, None)
        if producer is None:
            return
        try:
            async with asyncio.timeout(PRODUCER_STOP_S):
                await producer.stop()
        except Exception as exc:  # its open transaction is aborted by the next owner's start
            log.warning("stopping the producer of %s failed: %s", tp, exc)

    # --- one partition batch ----------------------------------------------------------------

    async def _process(
        self,
        consumer: AIOKafkaConsumer,
        tp: TopicPartition,
        raws: list[ConsumerRecord[bytes, bytes]],
    ) -> None:
        outcomes = await asyncio.gather(*(self._outcome(raw) for raw in raws))
        done = committable(outcomes)
        if done and not await self._commit(tp, raws[:done], outcomes[:done]):
            # Whether it committed (an ack lost after the commit) is the broker's to say: fence
            # again, then read the partition from its committed offset.
            self._unsynced.add(tp)
            await self._pause(self._retry_backoff_ms / 1000)
            return
        if done < len(raws):
            retry = outcomes[done]
            assert isinstance(retry, Retry)
            raw = raws[done]
            attempts = self._attempts.get((raw.topic, raw.partition, raw.offset), 0)
            log.warning(
                "%s[%d]@%d failed (attempt %d/%d; 0 when the broker failed), reading it again: %s",
                raw.topic,
                raw.partition,
                raw.offset,
                attempts,
                self._max_attempts,
                events.clip(repr(retry.error)),
            )
            consumer.seek(tp, raw.offset)
            backoff_s = self._retry_backoff_ms / 1000 * 2 ** max(attempts - 1, 0)
            await self._pause(min(backoff_s, MAX_POLL_BACKOFF_S))

    async def _outcome(self, raw: ConsumerRecord[bytes, bytes]) -> _Outcome:
        event: dict[str, Any] | None = None
        try:
            event = decode_value(raw, max_depth=self._settings.event_max_depth)
            record = to_record(raw, event, self._expected)
        except Exception as exc:  # the bytes cannot be read, now or ever
            return dead_letter_for(raw, unreadable(exc), event)
        refused = self._refused.pop((raw.topic, raw.partition, raw.offset), None)
        if refused is not None:
            return dead_letter_for(raw, refused, event)
        try:
            outputs = await self._transform(record)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # every failure is classified, none escapes the loop
            return self._counted_failure(raw, exc, event)
        try:
            await self._check_topics(outputs)
        except KafkaError as exc:
            # The broker could not be asked, which says nothing about the record: read it
            # again without counting an attempt, or a flaky broker would dead-letter it.
            return Retry(exc)
        except Exception as exc:  # a missing topic (NotFound, for good)
            return self._counted_failure(raw, exc, event)
        return outputs

    def _counted_failure(
        self, raw: ConsumerRecord[bytes, bytes], exc: Exception, event: dict[str, Any] | None
    ) -> _Outcome:
        where = (raw.topic, raw.partition, raw.offset)
        attempts = self._attempts.get(where, 0) + 1
        if is_poison(exc) or attempts >= self._max_attempts:
            self._attempts.pop(where, None)
            return dead_letter_for(raw, exc, event)
        self._attempts[where] = attempts
        return Retry(exc)

    async def _check_topics(self, outputs: Sequence[Output]) -> None:
        """NotFound for an output topic the broker lacks (a send would wait for it in vain)."""
        await self._known_topics.require(output.topic for output in outputs)

    async def _commit(
        self,
        tp: TopicPartition,
        raws: Sequence[ConsumerRecord[bytes, bytes]],
        outcomes: Sequence[_Outcome],
    ) -> bool:
        """Write ``outcomes`` and the offset after ``raws`` in one transaction; False (the
        producer dropped, the transaction left for the next owner to abort) when it failed."""
        letters = [o for o in outcomes if isinstance(o, DeadLetter)]
        answered = [
            (raw.offset, output)
            for raw, o in zip(raws, outcomes, strict=True)
            if not isinstance(o, DeadLetter | Retry)
            for output in o
        ]
        try:
            async with asyncio.timeout(TRANSACTION_TIMEOUT_S):
                producer = await self._producer(tp)
                await producer.begin_transaction()
                await self._write(producer, answered, letters)
                await producer.send_offsets_to_transaction({tp: raws[-1].offset + 1}, self.group_id)
                await producer.commit_transaction()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._failed(tp, exc, {output.topic for _, output in answered})
            await self._drop_producer(tp)
            return False
        for raw in raws:
            self._attempts.pop((raw.topic, raw.partition, raw.offset), None)
        for letter in letters:
            log.warning(  # the record's fault, not the service's: it goes on
                "dead-lettered %s[%d]@%d: %s: %s",
                letter.topic,
                letter.partition,
                letter.offset,
                letter.code,
                letter.message,
            )
        if self._on_commit is not None:
            self._on_commit(Committed(len(raws), len(answered), len(letters)))
        return True

    async def _write(
        self,
        producer: AIOKafkaProducer,
        answered: Sequence[tuple[int, Output]],
        letters: Sequence[DeadLetter],
    ) -> None:
        """Send the outputs (each with the offset of the record it answers) and the dead
        letters; Refused names the record whose output the broker refused for good."""
        sends: list[tuple[int | None, str, Any]] = []
        for offset, o in answered:
            key = None if o.key is None else o.key.encode()
            try:
                sent = await producer.send(o.topic, o.value, key=key, headers=o.headers or None)
            except REFUSED_OUTPUT as exc:  # refused before it left: over the producer's limit
                raise Refused(offset, o.topic, exc) from exc
            sends.append((offset, o.topic, sent))
        max_bytes = self._settings.kafka_max_message_bytes
        for letter in letters:
            value = events.encode(events.validate(letter.to_event(self.group_id, max_bytes)))
            key = None if letter.dlq_key is None else letter.dlq_key.encode()
            sends.append((None, DLQ.name, await producer.send(DLQ.name, value, key=key)))
        results = await asyncio.gather(*(sent for _, _, sent in sends), return_exceptions=True)
        for (owner, topic, _), result in zip(sends, results, strict=True):
            if isinstance(result, REFUSED_OUTPUT) and owner is not None:
                raise Refused(owner, topic, result) from result
        for result in results:
            if isinstance(result, BaseException):
                raise result

    def _failed(self, tp: TopicPartition, exc: Exception, topics: set[str]) -> None:
        """Note what a failed transaction says for the next round."""
        if isinstance(exc, Refused):
            self._refused[(tp.topic, tp.partition, exc.offset)] = exc.error
        # A topic deleted since it was last listed: the next round finds it missing.
        self._known_topics.forget(topics)
        if isinstance(exc, ProducerFenced):
            how = "fenced by a newer owner"
        elif isinstance(exc, TimeoutError):
            how = f"not done within {TRANSACTION_TIMEOUT_S:g} s"
        else:
            how = repr(exc)
        log.warning("transaction on %s failed (%s); reading it again", tp, events.clip(how))
