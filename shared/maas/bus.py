"""The Kafka bus: an idempotent producer and a consumer loop that never loses or loops.

Producer: ``enable_idempotence`` + ``acks=all``, so a retried send is written once. Events are
validated before they leave, so a bug in a producer never reaches other services.

Consumer: offsets are committed only after the handler returned (its effect is durable), so a
crash redelivers instead of dropping. A record that cannot be read (headers, bytes, nesting,
schema: any failure before the handler, whatever its type) or that the handler refuses for good
(a non-retriable ``MaasError``) goes to ``maas.dlq.v1`` with the reason and the original bytes
(cut to fit, size and sha256 kept; ``maas.deadletter``) and is then committed: one poison record
never blocks a partition. Other failures are retried with backoff by seeking back, and
dead-lettered after ``max_attempts``. A dead-letter write that keeps failing is retried with
backoff ``dlq_max_attempts`` times, the record uncommitted; then the loop stops with
``ConsumerDied`` saying why, and ``maas.liveness`` turns that into health and metrics. Each try
waits at most ``dlq_timeout_s`` for the broker's ack (an idempotent send to an unreachable broker
never fails by itself); an unacknowledged send stays queued and the next try waits for it rather
than queueing a copy.

The per-record decisions (decode, classify a failure) are plain functions; only ``run`` does I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import traceback
import uuid
import warnings
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import (
    InvalidProducerEpoch,
    KafkaError,
    OutOfOrderSequenceNumber,
    UnknownProducerId,
)

from maas import events
from maas.config import Settings
from maas.deadletter import DeadLetter, Headers
from maas.errors import MaasError, SchemaViolation, Unavailable
from maas.kafka_security import kafka_client_kwargs
from maas.topics import DLQ, Topic

log = logging.getLogger(__name__)

__all__ = ["DeadLetter", "Headers"]  # re-exported: consumers' hooks receive DeadLetter

MAX_DLQ_BACKOFF_S = 5.0
MAX_POLL_BACKOFF_S = 5.0
DLQ_TIMEOUT_S = 10.0


class ConsumerDied(Unavailable):
    """A consumer loop stopped for good; the message says why and what stays uncommitted."""

    reason_code = "consumer_died"


@dataclass(frozen=True)
class Record:
    """A decoded, validated event with where it came from."""

    topic: str
    partition: int
    offset: int
    key: str | None
    event: dict[str, Any]
    headers: Headers = field(default_factory=list)
    timestamp_ms: int = 0


def _topic_name(topic: str | Topic) -> str:
    return topic.name if isinstance(topic, Topic) else topic


def _key_text(key: bytes | None) -> str | None:
    return None if key is None else bytes(key).decode("utf-8", errors="replace")


# --- pure steps ---------------------------------------------------------------------------------


def read_headers(raw: ConsumerRecord[bytes, bytes]) -> Headers:
    """The record's headers as (text key, bytes or None); never fails, whatever the bytes."""
    headers: Headers = []
    for key, value in raw.headers or ():
        text = key if isinstance(key, str) else bytes(key).decode("utf-8", errors="replace")
        headers.append((text, None if value is None else bytes(value)))
    return headers


def decode_value(
    raw: ConsumerRecord[bytes, bytes], *, max_depth: int = Settings.event_max_depth
) -> dict[str, Any]:
    """Raw Kafka record -> event map; raises SchemaViolation when it cannot be decoded."""
    return events.decode(raw.value, read_headers(raw), max_depth=max_depth)


def to_record(
    raw: ConsumerRecord[bytes, bytes],
    event: dict[str, Any],
    expected_schemas: Iterable[str] | None,
) -> Record:
    """A decoded event -> validated ``Record``; raises SchemaViolation with the reason."""
    events.validate(event, expected_schemas)
    return Record(
        topic=raw.topic,
        partition=raw.partition,
        offset=raw.offset,
        key=_key_text(raw.key),
        event=event,
        headers=read_headers(raw),
        timestamp_ms=raw.timestamp,
    )


def read_record(
    raw: ConsumerRecord[bytes, bytes],
    expected_schemas: Iterable[str] | None,
    *,
    max_depth: int = Settings.event_max_depth,
) -> Record:
    """Decode and validate; every failure, whatever its type, is a SchemaViolation (poison)."""
    try:
        return to_record(raw, decode_value(raw, max_depth=max_depth), expected_schemas)
    except Exception as exc:
        raise unreadable(exc) from exc


def unreadable(error: Exception) -> SchemaViolation:
    """A failure to read a record as the SchemaViolation it is: retrying cannot change the bytes
    (a reader bug on odd bytes included)."""
    if isinstance(error, SchemaViolation):
        return error
    return SchemaViolation(
        events.clip(f"record could not be read: {type(error).__name__}: {error}")
    )


def dead_letter_for(
    raw: ConsumerRecord[bytes, bytes], error: BaseException, event: dict[str, Any] | None
) -> DeadLetter:
    if isinstance(error, MaasError):
        code, message = error.reason_code, error.message
    else:
        code, message = "handler_failed", f"{type(error).__name__}: {error}"
    return DeadLetter(
        topic=raw.topic,
        partition=raw.partition,
        offset=raw.offset,
        key=_key_text(raw.key),
        value=None if raw.value is None else bytes(raw.value),
        headers=read_headers(raw),
        code=code,
        message=events.clip(message),
        event=event,
    )


def is_poison(error: BaseException) -> bool:
    """True when retrying the same record can never succeed."""
    return isinstance(error, MaasError) and not error.retriable


def dlq_backoff_s(failures: int, base_ms: int) -> float:
    """How long to wait after the ``failures``-th failed dead-letter write in a row."""
    return float(min(base_ms / 1000 * 2 ** (failures - 1), MAX_DLQ_BACKOFF_S))


# --- producer -----------------------------------------------------------------------------------


# The broker no longer takes this producer id's sequence: batches that expired while it was away
# left a gap, or it lost the id's state. aiokafka never recovers from these (every later send
# fails the same way), so the producer is replaced: a new one gets a new id.
STALE_PRODUCER_ERRORS = (OutOfOrderSequenceNumber, UnknownProducerId, InvalidProducerEpoch)
_STOP_STALE_S = 5.0


class EventProducer:
    """Idempotent, acks=all producer of validated events (msgpack on the wire)."""

    def __init__(
        self, settings: Settings, *, client_id: str = "maas", request_timeout_ms: int = 30_000
    ) -> None:
        self._settings = settings
        self._client_id = client_id
        self._request_timeout_ms = request_timeout_ms
        self._producer: AIOKafkaProducer | None = None
        self._replacing = asyncio.Lock()

    async def start(self) -> None:
        if self._producer is not None:
            return
        self._producer = await self._started()

    async def _started(self) -> AIOKafkaProducer:
        producer = AIOKafkaProducer(
            bootstrap_servers=self._settings.kafka_bootstrap,
            **kafka_client_kwargs(self._settings),
            client_id=self._client_id,
            enable_idempotence=True,
            acks="all",
            max_request_size=self._settings.kafka_max_message_bytes,
            linger_ms=2,
            request_timeout_ms=self._request_timeout_ms,
        )
        try:
            await producer.start()
        except KafkaError as exc:
            await producer.stop()
            raise Unavailable(
                f"cannot reach Kafka at {self._settings.kafka_bootstrap}: {exc}; is the broker "
                "up (`maas stack status`)?"
            ) from exc
        return producer

    async def _failed(self, producer: AIOKafkaProducer, topic: str, exc: KafkaError) -> Unavailable:
        """What a failed send raises; a producer the broker no longer takes is replaced first."""
        if isinstance(exc, STALE_PRODUCER_ERRORS):
            log.warning("%s: Kafka refused the producer (%r); starting a new one", topic, exc)
            await self._replace(producer)
        return Unavailable(f"sending to {topic} failed: {exc}")

    async def _replace(self, stale: AIOKafkaProducer) -> None:
        """Once, however many sends saw ``stale`` fail; if Kafka cannot be reached now, the
        next failure tries again."""
        close_stale = stale.stop
        async with self._replacing:
            if stale is not self._producer:
                return  # replaced already (or stopped)
            try:
                fresh = await self._started()
            except Unavailable:
                return
            self._producer = fresh
        with contextlib.suppress(Exception):  # its pending sends fail anyway
            await asyncio.wait_for(close_stale(), _STOP_STALE_S)

    async def stop(self) -> None:
        if self._producer is not None:
            producer, self._producer = self._producer, None
            await producer.stop()

    async def __aenter__(self) -> EventProducer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def __del__(self) -> None:
        if self._producer is not None:
            warnings.warn(
                "EventProducer was never stopped; use `async with` or call stop()",
                ResourceWarning,
                stacklevel=1,
            )

    def _require(self) -> AIOKafkaProducer:
        if self._producer is None:
            raise RuntimeError("EventProducer used before start() or after stop()")
        return self._producer

    async def send(
        self,
        topic: str | Topic,
        event: dict[str, Any],
        *,
        key: str | None = None,
        headers: Headers | None = None,
        partition: int | None = None,
    ) -> Any:
        """Validate, encode and send one event; returns once the broker acknowledged it.

        ``partition`` overrides the key's hash (training routes shard ``s`` to ``s % n``).
        """
        events.validate(event)
        return await self.send_raw(
            topic, events.encode(event), key=key, headers=headers, partition=partition
        )

    async def send_raw(
        self,
        topic: str | Topic,
        value: bytes,
        *,
        key: str | None = None,
        headers: Headers | None = None,
        partition: int | None = None,
    ) -> Any:
        producer = self._require()
        try:
            return await producer.send_and_wait(
                _topic_name(topic),
                value,
                key=None if key is None else key.encode(),
                headers=headers or None,
                partition=partition,
            )
        except KafkaError as exc:
            raise await self._failed(producer, _topic_name(topic), exc) from exc

    async def send_many(
        self, topic: str | Topic, items: Sequence[tuple[str | None, dict[str, Any]]]
    ) -> None:
        """Send several events concurrently (batched by the client), waiting for every ack."""
        producer = self._require()
        futures = []
        for key, event in items:
            events.validate(event)
            futures.append(
                await producer.send(
                    _topic_name(topic),
                    events.encode(event),
                    key=None if key is None else key.encode(),
                )
            )
        try:
            await asyncio.gather(*futures)
        except KafkaError as exc:
            raise await self._failed(producer, _topic_name(topic), exc) from exc


# --- consumer -----------------------------------------------------------------------------------

Handler = Callable[[Record], Awaitable[None]]
DeadLetterHook = Callable[[DeadLetter], Awaitable[None]]


class EventConsumer:
    """Consume, validate, handle, then commit; poison goes to the DLQ, never a crash loop."""

    def __init__(
        self,
        settings: Settings,
        *,
        topics: Sequence[str | Topic],
        group_id: str,
        handler: Handler,
        producer: EventProducer,
        expected_schemas: Iterable[str] | None = None,
        on_dead_letter: DeadLetterHook | None = None,
        max_attempts: int = 5,
        retry_backoff_ms: int = 200,
        auto_offset_reset: str = "earliest",
        max_poll_records: int = 100,
        dlq_timeout_s: float = DLQ_TIMEOUT_S,
    ) -> None:
        self._settings = settings
        self._topics = [_topic_name(t) for t in topics]
        self.group_id = group_id
        self._handler = handler
        self._producer = producer
        self._expected = list(expected_schemas) if expected_schemas is not None else None
        self._on_dead_letter = on_dead_letter
        self._max_attempts = max_attempts
        self._retry_backoff_ms = retry_backoff_ms
        self._auto_offset_reset = auto_offset_reset
        self._max_poll_records = max_poll_records
        self._dlq_timeout_s = dlq_timeout_s
        self._consumer: AIOKafkaConsumer | None = None
        self._attempts: dict[tuple[str, int, int], int] = {}
        self._dlq_failures = 0
        self._dlq_sends: dict[tuple[str, int, int], asyncio.Future[Any]] = {}
        # Offsets whose commit failed (a coordinator moving, a timeout): committed again before
        # the next batch, so a restart does not redeliver what was done long ago.
        self._uncommitted: dict[TopicPartition, int] = {}
        self._stopping = asyncio.Event()
        self.handled = 0
        self.dead_lettered = 0

    async def start(self) -> None:
        if self._consumer is not None:
            return
        consumer = AIOKafkaConsumer(
            *self._topics,
            bootstrap_servers=self._settings.kafka_bootstrap,
            **kafka_client_kwargs(self._settings),
            group_id=self.group_id,
            client_id=f"{self.group_id}-{uuid.uuid4().hex[:6]}",
            enable_auto_commit=False,
            auto_offset_reset=self._auto_offset_reset,
            max_partition_fetch_bytes=self._settings.kafka_max_message_bytes,
            fetch_max_bytes=max(52_428_800, self._settings.kafka_max_message_bytes),
            max_poll_records=self._max_poll_records,
        )
        try:
            await consumer.start()
        except KafkaError as exc:
            await consumer.stop()
            raise Unavailable(
                f"cannot reach Kafka at {self._settings.kafka_bootstrap}: {exc}"
            ) from exc
        self._consumer = consumer

    async def stop(self) -> None:
        self._stopping.set()
        for send in self._dlq_sends.values():
            send.cancel()  # our wait only: the producer still holds the queued letter
        self._dlq_sends.clear()
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            await consumer.stop()

    async def __aenter__(self) -> EventConsumer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def wait_assigned(self, timeout_s: float = 30.0) -> None:
        """Wait until the group has given this consumer partitions (it is live)."""
        consumer = self._require()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not consumer.assignment():
            if loop.time() > deadline:
                raise Unavailable(f"consumer group {self.group_id} got no partitions in time")
            await asyncio.sleep(0.05)

    def _require(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            raise RuntimeError("EventConsumer used before start() or after stop()")
        return self._consumer

    async def run(self) -> None:
        """Process records until ``stop()``; transient broker errors are waited out.

        Raises ConsumerDied when the DLQ stayed unwritable (the record is left uncommitted).
        """
        consumer = self._require()
        lost = 0
        while not self._stopping.is_set():
            try:
                batches = await consumer.getmany(timeout_ms=200)
            except KafkaError as exc:
                if not exc.retriable:
                    raise ConsumerDied(f"consumer {self.group_id} cannot fetch: {exc!r}") from exc
                lost += 1
                log.warning("consumer %s lost the broker (%s); retrying", self.group_id, exc)
                await self._pause(min(0.5 * lost, MAX_POLL_BACKOFF_S))
                continue
            lost = 0
            await self._commit_again(consumer)
            for tp, raws in batches.items():
                await self._process_partition(consumer, tp, raws)

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake at once on ``stop()``."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _process_partition(
        self,
        consumer: AIOKafkaConsumer,
        tp: TopicPartition,
        raws: list[ConsumerRecord[bytes, bytes]],
    ) -> None:
        next_offset: int | None = None
        try:
            for raw in raws:
                if self._stopping.is_set():
                    break
                if not await self._process_one(raw):
                    # Redeliver from this record; later records of the partition wait their turn.
                    consumer.seek(tp, raw.offset)
                    break
                next_offset = raw.offset + 1
        except ConsumerDied:
            if next_offset is not None:
                await self._commit(consumer, tp, next_offset)  # what was done stays done
            raise
        if next_offset is not None:
            # One commit per partition batch: every record before next_offset is done.
            await self._commit(consumer, tp, next_offset)

    async def _process_one(self, raw: ConsumerRecord[bytes, bytes]) -> bool:
        """Handle one record; True when it may be committed (handled or dead-lettered)."""
        event: dict[str, Any] | None = None
        try:
            event = decode_value(raw, max_depth=self._settings.event_max_depth)
            record = to_record(raw, event, self._expected)
        except Exception as exc:  # the bytes cannot be read, now or ever: no retries
            return await self._reject(raw, unreadable(exc), event)
        where = (raw.topic, raw.partition, raw.offset)
        try:
            await self._handler(record)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # every failure is classified, none escapes the loop
            attempts = self._attempts.get(where, 0) + 1
            if is_poison(exc) or attempts >= self._max_attempts:
                return await self._reject(raw, exc, record.event)
            self._attempts[where] = attempts
            log.warning(
                "handler failed on %s[%d]@%d (attempt %d/%d), will redeliver: %s",
                raw.topic,
                raw.partition,
                raw.offset,
                attempts,
                self._max_attempts,
                events.clip("".join(traceback.format_exception_only(exc)).strip()),
            )
            await self._pause(self._retry_backoff_ms / 1000 * 2 ** (attempts - 1))
            return False
        self._attempts.pop(where, None)
        self.handled += 1
        return True

    async def _reject(
        self, raw: ConsumerRecord[bytes, bytes], error: BaseException, event: dict[str, Any] | None
    ) -> bool:
        """Dead-letter ``raw``; True once written, False (after a backoff) to try again."""
        try:
            await self._dead_letter(dead_letter_for(raw, error, event))
        except Exception as exc:  # a DLQ write failing for any reason keeps the record
            self._dlq_failures += 1
            where = f"{raw.topic}[{raw.partition}]@{raw.offset}"
            if self._dlq_failures >= self._settings.dlq_max_attempts:
                raise ConsumerDied(
                    f"consumer {self.group_id} could not write to {DLQ.name} "
                    f"{self._dlq_failures} times in a row ({events.clip(repr(exc), 300)}); "
                    f"{where} stays uncommitted and is read again after a restart"
                ) from exc
            delay = dlq_backoff_s(self._dlq_failures, self._retry_backoff_ms)
            log.warning(
                "DLQ write failed (%s); keeping %s, retry %d/%d in %.1f s",
                events.clip(repr(exc), 300),
                where,
                self._dlq_failures,
                self._settings.dlq_max_attempts,
                delay,
            )
            await self._pause(delay)
            return False
        self._dlq_failures = 0
        self._attempts.pop((raw.topic, raw.partition, raw.offset), None)
        return True

    async def _dead_letter(self, letter: DeadLetter) -> None:
        log.error(
            "dead-lettering %s[%d]@%d: %s: %s",
            letter.topic,
            letter.partition,
            letter.offset,
            letter.code,
            letter.message,
        )
        # The DLQ write must succeed before the commit, or the record would be lost: this
        # raises (the loop keeps the record uncommitted) when Kafka is down.
        await self._write_letter(letter)
        self.dead_lettered += 1
        if self._on_dead_letter is not None:
            try:
                await self._on_dead_letter(letter)
            except Exception:
                log.exception("on_dead_letter hook failed for %s@%d", letter.topic, letter.offset)

    async def _write_letter(self, letter: DeadLetter) -> None:
        """Send ``letter`` (or wait again for its earlier, unacknowledged send), at most
        ``dlq_timeout_s``; raises Unavailable when no ack came in time."""
        where = (letter.topic, letter.partition, letter.offset)
        send = self._dlq_sends.get(where)
        if send is None:
            dlq_event = letter.to_event(self.group_id, self._settings.kafka_max_message_bytes)
            send = asyncio.ensure_future(self._producer.send(DLQ, dlq_event, key=letter.dlq_key))
            self._dlq_sends[where] = send
        try:
            await asyncio.wait_for(asyncio.shield(send), self._dlq_timeout_s)
        except TimeoutError:
            raise Unavailable(
                f"{DLQ.name} acknowledged no write within {self._dlq_timeout_s:g} s"
            ) from None
        finally:
            if send.done():
                del self._dlq_sends[where]

    async def _commit(self, consumer: AIOKafkaConsumer, tp: TopicPartition, offset: int) -> None:
        try:
            await consumer.commit({tp: offset})
        except KafkaError as exc:
            # A lost commit only means a redelivery, which handlers are idempotent against.
            log.warning("commit of %s@%d failed (%s); will commit it again", tp, offset, exc)
            self._uncommitted[tp] = offset
        else:
            self._uncommitted.pop(tp, None)

    async def _commit_again(self, consumer: AIOKafkaConsumer) -> None:
        """Commit the offsets whose commit failed, for partitions this member still owns."""
        owned = consumer.assignment()
        for tp, offset in list(self._uncommitted.items()):
            if tp in owned:
                await self._commit(consumer, tp, offset)
            else:
                del self._uncommitted[tp]  # its new owner commits from where it reads
