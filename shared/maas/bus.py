"""The Kafka bus: every Kafka client of the platform is made in the ``maas.bus`` modules.

- ``EventProducer`` (here): idempotent (``enable_idempotence`` + ``acks=all``, so a retried send
  is written once); events are validated before they leave, so a bug in a producer never
  reaches other services. A producer the broker no longer takes is replaced.
- ``open_consumer`` (here): the one consumer factory. Security settings, message-size limits,
  offsets never auto-committed, a per-consumer ``max_poll_interval_ms``; a broker that cannot be
  reached is ``Unavailable`` saying what to check.
- The per-record steps every reader shares (here, plain functions): read headers, decode,
  validate, build a dead letter, classify a failure.
- ``maas.bus_consumer``: ``EventConsumer``, a consumer group's loop that never loses or loops
  (commit after the handler, poison to ``maas.dlq.v1``).
- ``maas.bus_reader.PartitionReader``: chosen partitions without a group (every reader sees
  every record: job statuses, training control).
- ``maas.bus_fetch``: ``fetch``, every reader's fetch (a record the Kafka client cannot parse,
  a header key that is not UTF-8, comes as a stand-in that reads as unreadable, nothing lost),
  and ``Fetcher``, every consumer loop's fetch (a lost broker waited out).
- ``maas.bus_transactions.TransactionalPipe``: consume, transform and produce exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import (
    AIOKafkaConsumer,
    AIOKafkaProducer,
    ConsumerRebalanceListener,
    ConsumerRecord,
    TopicPartition,
)
from aiokafka.errors import (
    InvalidProducerEpoch,
    KafkaError,
    OutOfOrderSequenceNumber,
    UnknownProducerId,
)

from maas import events
from maas.bus_fetch import unreadable_reason
from maas.config import Settings
from maas.deadletter import DeadLetter, Headers
from maas.errors import ConsumerDied, MaasError, SchemaViolation, Unavailable
from maas.kafka_security import kafka_client_kwargs
from maas.topics import Topic

log = logging.getLogger(__name__)

# Re-exported: consumers' hooks receive DeadLetter, and their loops end with ConsumerDied.
__all__ = ["ConsumerDied", "DeadLetter", "Headers"]

MAX_DLQ_BACKOFF_S = 5.0
# The longest a stopping client waits on Kafka for one farewell (a producer's pending sends, a
# consumer leaving its group, a member's last word): with the broker away, aiokafka waits its
# request timeout (30 s) and more, and a process must be gone within its stop grace (compose:
# 30 s, the test harnesses: 20 s) after a few of them.
KAFKA_STOP_S = 2.0


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


def topic_name(topic: str | Topic) -> str:
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
    """Raw Kafka record -> event map; raises SchemaViolation when it cannot be decoded (a
    stand-in for a record the client could not parse, ``maas.bus_fetch``, says why)."""
    reason = unreadable_reason(raw)
    if reason is not None:
        raise SchemaViolation(events.clip(reason))
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
        message=events.clip(events.utf8_text(message)),  # whatever the reason quotes
        event=event,
    )


def is_poison(error: BaseException) -> bool:
    """True when retrying the same record can never succeed."""
    return isinstance(error, MaasError) and not error.retriable


def unreachable(settings: Settings, error: KafkaError) -> Unavailable:
    """A client that could not start, as the Unavailable that says what to check."""
    return Unavailable(
        f"cannot reach Kafka at {settings.kafka_bootstrap}: {error}; is the broker up "
        "(`maas stack status`) and MAAS_KAFKA_BOOTSTRAP right?"
    )


def dlq_backoff_s(failures: int, base_ms: int) -> float:
    """How long to wait after the ``failures``-th failed dead-letter write in a row."""
    return float(min(base_ms / 1000 * 2 ** (failures - 1), MAX_DLQ_BACKOFF_S))


# --- producer -----------------------------------------------------------------------------------


# The broker no longer takes this producer id's sequence: batches that expired while it was away
# left a gap, or it lost the id's state. aiokafka never recovers from these (every later send
# fails the same way), so the producer is replaced: a new one gets a new id.
STALE_PRODUCER_ERRORS = (OutOfOrderSequenceNumber, UnknownProducerId, InvalidProducerEpoch)
_STOP_STALE_S = 5.0


def producer_options(settings: Settings, client_id: str) -> dict[str, Any]:
    """What every producer of the platform is made with: idempotent, acks=all, the security
    settings and the message-size limit."""
    return {
        "bootstrap_servers": settings.kafka_bootstrap,
        **kafka_client_kwargs(settings),
        "client_id": client_id,
        "enable_idempotence": True,
        "acks": "all",
        "max_request_size": settings.kafka_max_message_bytes,
        "linger_ms": 2,
    }


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
            **producer_options(self._settings, self._client_id),
            request_timeout_ms=self._request_timeout_ms,
        )
        try:
            await producer.start()
        except KafkaError as exc:
            await producer.stop()
            raise unreachable(self._settings, exc) from exc
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
            async with asyncio.timeout(_STOP_STALE_S):
                await close_stale()

    async def stop(self) -> None:
        """Send what is pending and close, waiting at most KAFKA_STOP_S: what Kafka has not
        taken by then is dropped (its senders were told it failed or gave up waiting)."""
        if self._producer is None:
            return
        producer, self._producer = self._producer, None
        try:
            async with asyncio.timeout(KAFKA_STOP_S):
                await producer.stop()
        except TimeoutError:
            log.warning(
                "%s: Kafka took no pending event within %g s; stopped without them",
                self._client_id,
                KAFKA_STOP_S,
            )

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

    async def ping(self) -> None:
        """Return once a broker answered a metadata request (a readiness check: a fresh
        request on this producer's connections; what the producer has cached does not count)."""
        try:
            await self._require().client.fetch_all_metadata()
        except KafkaError as exc:
            raise Unavailable(f"Kafka at {self._settings.kafka_bootstrap}: {exc}") from exc

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
                topic_name(topic),
                value,
                key=None if key is None else key.encode(),
                headers=headers or None,
                partition=partition,
            )
        except KafkaError as exc:
            raise await self._failed(producer, topic_name(topic), exc) from exc

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
                    topic_name(topic),
                    events.encode(event),
                    key=None if key is None else key.encode(),
                )
            )
        try:
            await asyncio.gather(*futures)
        except KafkaError as exc:
            raise await self._failed(producer, topic_name(topic), exc) from exc


# --- consumer factory ---------------------------------------------------------------------------


async def open_consumer(
    settings: Settings,
    *,
    client_id: str,
    group_id: str | None = None,
    topics: Sequence[str] = (),
    listener: ConsumerRebalanceListener | None = None,
    partitions: Sequence[TopicPartition] = (),
    auto_offset_reset: str = "earliest",
    isolation_level: str = "read_committed",
    max_poll_records: int | None = None,
    max_poll_interval_ms: int | None = None,
    fetch_max_wait_ms: int = 500,
) -> AIOKafkaConsumer:
    """A started consumer: subscribed to ``topics`` in ``group_id`` (with ``listener``), or
    assigned ``partitions`` without a group. Offsets are committed by the caller, never
    automatically. Records of transactions their producer aborted are never read (a job a
    transactional producer took back must not run); a transaction still open holds its
    partition's later records back until it ends or the broker times it out.
    ``max_poll_interval_ms`` is how long a group member may spend between two fetches before
    the group gives its partitions away (Kafka's default: 5 min). Raises Unavailable, saying
    what to check, when the broker cannot be reached."""
    limit = settings.kafka_max_message_bytes
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        **kafka_client_kwargs(settings),
        group_id=group_id,
        client_id=client_id,
        enable_auto_commit=False,
        auto_offset_reset=auto_offset_reset,
        isolation_level=isolation_level,
        max_partition_fetch_bytes=limit,
        fetch_max_bytes=max(52_428_800, limit),
        fetch_max_wait_ms=fetch_max_wait_ms,
        max_poll_records=max_poll_records,
        **({} if max_poll_interval_ms is None else {"max_poll_interval_ms": max_poll_interval_ms}),
    )
    if topics:
        consumer.subscribe(list(topics), listener=listener)
    try:
        await consumer.start()
    except KafkaError as exc:
        await stop_consumer(consumer)
        raise unreachable(settings, exc) from exc
    if partitions:
        consumer.assign(list(partitions))
    return consumer


async def stop_consumer(consumer: AIOKafkaConsumer) -> None:
    """Close ``consumer`` (leave its group), waiting at most KAFKA_STOP_S. With the broker
    away, aiokafka 0.14's fetcher re-raises the CancelledError of a fetch it cancels on close,
    which ended a stopping service with a traceback: that one is not a cancellation of the
    caller's task, so it is not passed on."""
    try:
        async with asyncio.timeout(KAFKA_STOP_S):
            await consumer.stop()
    except TimeoutError:
        log.warning("Kafka consumer not closed cleanly within %g s; left behind", KAFKA_STOP_S)
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        log.debug("Kafka consumer closed while a fetch was retrying")
