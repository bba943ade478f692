"""A consumer group's loop on the bus that never loses or loops.

Offsets are committed only after the handler returned (its effect is durable), so a crash
redelivers instead of dropping. A record that cannot be read (headers, bytes, nesting, schema:
any failure before the handler, whatever its type) or that the handler refuses for good (a
non-retriable ``MaasError``) goes to ``maas.dlq.v1`` with the reason and the original bytes (cut
to fit, size and sha256 kept; ``maas.deadletter``) and is then committed: one poison record never
blocks a partition. Other failures are retried with backoff by seeking back, and dead-lettered
after ``max_attempts`` — and, for a retriable ``MaasError`` (a registry or S3 restarting), not
before ``retry_outage_s`` either: an outage of a few seconds must not fail the job it hit. A
dead-letter write that keeps failing is retried with backoff ``dlq_max_attempts`` times, the
record uncommitted; then the loop stops with ``ConsumerDied`` saying why, and ``maas.liveness``
turns that into health and metrics. Each try waits at most ``dlq_timeout_s`` for the broker's
ack (an idempotent send to an unreachable broker never fails by itself); an unacknowledged send
stays queued and the next try waits for it rather than queueing a copy.

A handler that may run long (a compress job) needs a ``max_poll_interval_ms`` longer than it:
the group gives away the partitions of a member that fetched nothing for that long.
"""

from __future__ import annotations

import asyncio
import logging
import traceback
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from maas import events
from maas.bus import (
    ConsumerDied,
    EventProducer,
    Record,
    dead_letter_for,
    decode_value,
    dlq_backoff_s,
    is_poison,
    open_consumer,
    stop_consumer,
    to_record,
    topic_name,
    unreadable,
)
from maas.bus_fetch import Fetcher
from maas.config import Settings
from maas.deadletter import DeadLetter
from maas.errors import MaasError, Unavailable
from maas.topics import DLQ, Topic
from maas.waiting import set_within

log = logging.getLogger(__name__)

DLQ_TIMEOUT_S = 10.0
# A record whose handler meets an outage (a retriable MaasError) is retried this long at least,
# its backoff growing to MAX_RETRY_BACKOFF_S, before it is dead-lettered.
RETRY_OUTAGE_S = 120.0
MAX_RETRY_BACKOFF_S = 10.0
# aiokafka retries a commit while the coordinator is unknown, with no end: after the client
# closed (stop() racing a commit) that would be for ever. A commit is given this long, or until
# the client closed, and then counts as failed (committed again later, or redelivered).
COMMIT_TIMEOUT_S = 30.0


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
        retry_outage_s: float = RETRY_OUTAGE_S,
        auto_offset_reset: str = "earliest",
        max_poll_records: int = 100,
        dlq_timeout_s: float = DLQ_TIMEOUT_S,
        max_poll_interval_ms: int | None = None,
    ) -> None:
        self._settings = settings
        self._topics = [topic_name(t) for t in topics]
        self.group_id = group_id
        self._handler = handler
        self._producer = producer
        self._expected = list(expected_schemas) if expected_schemas is not None else None
        self._on_dead_letter = on_dead_letter
        self._max_attempts = max_attempts
        self._retry_outage_s = retry_outage_s
        # record -> when its handler first failed with a retriable MaasError (loop time)
        self._outage_since: dict[tuple[str, int, int], float] = {}
        self._retry_backoff_ms = retry_backoff_ms
        self._auto_offset_reset = auto_offset_reset
        self._max_poll_records = max_poll_records
        self._dlq_timeout_s = dlq_timeout_s
        self._max_poll_interval_ms = max_poll_interval_ms
        self._consumer: AIOKafkaConsumer | None = None
        self._attempts: dict[tuple[str, int, int], int] = {}
        self._dlq_failures = 0
        self._dlq_sends: dict[tuple[str, int, int], asyncio.Future[Any]] = {}
        # Offsets whose commit failed (a coordinator moving, a timeout): committed again before
        # the next batch, so a restart does not redeliver what was done long ago.
        self._uncommitted: dict[TopicPartition, int] = {}
        self._stopping = asyncio.Event()
        self._closed = asyncio.Event()  # the client is closed: no commit can succeed any more
        self.handled = 0
        self.dead_lettered = 0

    async def start(self) -> None:
        if self._consumer is not None:
            return
        self._consumer = await open_consumer(
            self._settings,
            topics=self._topics,
            group_id=self.group_id,
            client_id=f"{self.group_id}-{uuid.uuid4().hex[:6]}",
            auto_offset_reset=self._auto_offset_reset,
            max_poll_records=self._max_poll_records,
            max_poll_interval_ms=self._max_poll_interval_ms,
        )

    async def stop(self) -> None:
        self._stopping.set()
        for send in self._dlq_sends.values():
            send.cancel()  # our wait only: the producer still holds the queued letter
        self._dlq_sends.clear()
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            await stop_consumer(consumer)
        self._closed.set()

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
        fetcher = Fetcher(consumer, self.group_id, self._pause, self._auto_offset_reset)
        while not self._stopping.is_set():
            batches = await fetcher.next()
            if batches is None:
                continue
            await self._commit_again(consumer)
            for tp, raws in batches.items():
                await self._process_partition(consumer, tp, raws)

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake at once on ``stop()``."""
        await set_within(self._stopping, seconds)

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
            if isinstance(exc, MaasError):  # a retriable one: what is away may come back
                self._outage_since.setdefault(where, asyncio.get_running_loop().time())
            if is_poison(exc) or (attempts >= self._max_attempts and self._retries_spent(where)):
                self._outage_since.pop(where, None)
                return await self._reject(raw, exc, record.event)
            self._attempts[where] = attempts
            log.warning(
                # An outage is retried past max_attempts, until retry_outage_s: "attempt 9/5"
                # read as a miscount.
                "handler failed on %s[%d]@%d (attempt %d; dead-lettered after %d, or %g s of an "
                "outage), will redeliver: %s",
                raw.topic,
                raw.partition,
                raw.offset,
                attempts,
                self._max_attempts,
                self._retry_outage_s,
                events.clip("".join(traceback.format_exception_only(exc)).strip()),
            )
            backoff_s = self._retry_backoff_ms / 1000 * 2 ** min(attempts - 1, 16)
            await self._pause(min(backoff_s, MAX_RETRY_BACKOFF_S))
            return False
        self._attempts.pop(where, None)
        self._outage_since.pop(where, None)
        self.handled += 1
        return True

    def _retries_spent(self, where: tuple[str, int, int]) -> bool:
        """Whether a record failing for ``max_attempts`` has been retried long enough: yes for
        a bug; for an outage, once ``retry_outage_s`` passed since its first failure."""
        since = self._outage_since.get(where)
        return since is None or asyncio.get_running_loop().time() - since >= self._retry_outage_s

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
        log.warning(  # the record's fault, not the service's: it goes on
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
            async with asyncio.timeout(self._dlq_timeout_s):
                await asyncio.shield(send)
        except TimeoutError:
            raise Unavailable(
                f"{DLQ.name} acknowledged no write within {self._dlq_timeout_s:g} s"
            ) from None
        finally:
            if send.done():
                del self._dlq_sends[where]

    async def _commit(self, consumer: AIOKafkaConsumer, tp: TopicPartition, offset: int) -> None:
        try:
            await self._until_closed(consumer.commit({tp: offset}), COMMIT_TIMEOUT_S)
        except (KafkaError, TimeoutError) as exc:
            # A lost commit only means a redelivery, which handlers are idempotent against.
            log.warning("commit of %s@%d failed (%s); will commit it again", tp, offset, exc)
            self._uncommitted[tp] = offset
        else:
            self._uncommitted.pop(tp, None)

    async def _until_closed(self, work: Awaitable[Any], timeout_s: float) -> None:
        """Await ``work``; cancel it and raise TimeoutError after ``timeout_s`` or once the
        client is closed."""
        task = asyncio.ensure_future(work)
        closed = asyncio.ensure_future(self._closed.wait())
        try:
            await asyncio.wait(
                {task, closed}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            closed.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            reason = "the client closed" if self._closed.is_set() else f"{timeout_s:g} s passed"
            raise TimeoutError(f"{reason} before the broker acknowledged it")
        task.result()

    async def _commit_again(self, consumer: AIOKafkaConsumer) -> None:
        """Commit the offsets whose commit failed, for partitions this member still owns."""
        owned = consumer.assignment()
        for tp, offset in list(self._uncommitted.items()):
            if tp in owned:
                await self._commit(consumer, tp, offset)
            else:
                del self._uncommitted[tp]  # its new owner commits from where it reads


def dead_letter_group(
    settings: Settings,
    topic: Topic,
    *,
    group_id: str,
    producer: EventProducer,
    expected_schemas: Iterable[str],
) -> EventConsumer:
    """The consumer group of a topic that only group-less readers act on (job statuses): it
    handles nothing and dead-letters what cannot be read, so that no bad record is dropped
    without a trace (the readers skip it). It starts at the end the first time it runs."""

    async def read(record: Record) -> None:
        """A record that reads is the readers' business."""

    return EventConsumer(
        settings,
        topics=[topic],
        group_id=group_id,
        handler=read,
        producer=producer,
        expected_schemas=expected_schemas,
        auto_offset_reset="latest",
    )
