"""Relay of the outbox table to ``maas.models.v1``.

The metadata store writes events in the same transaction as the change they describe; this loop
publishes them in commit order and marks them sent once Kafka acknowledged. While the broker is
down it keeps retrying with backoff (the events wait safely in SQLite); delivery is at least once
(an event acknowledged but not yet marked is sent again after a crash), so consumers dedupe by
event ``id``.
"""

from __future__ import annotations

import asyncio
import logging

from maas.bus import EventProducer
from maas.errors import Unavailable
from maas.waiting import set_within
from services.model_registry.store import RegistryStore

log = logging.getLogger(__name__)


class OutboxRelay:
    def __init__(
        self,
        metadata: RegistryStore,
        producer: EventProducer,
        *,
        batch_size: int = 100,
        poll_interval_ms: int = 1000,
        retry_backoff_ms: int = 250,
        max_backoff_ms: int = 5000,
    ) -> None:
        self._metadata = metadata
        self._producer = producer
        self._batch_size = batch_size
        self._poll_interval_ms = poll_interval_ms
        self._retry_backoff_ms = retry_backoff_ms
        self._max_backoff_ms = max_backoff_ms
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._producer_started = False
        self._starting = asyncio.Lock()  # the relay and the readiness check both start it
        self.sent = 0

    def wake(self) -> None:
        """Something was committed: look at the outbox now rather than at the next poll."""
        self._wake.set()

    async def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    async def run(self) -> None:
        backoff_ms = self._retry_backoff_ms
        while not self._stopping.is_set():
            self._wake.clear()  # commits from here on are picked up by this round or the next
            try:
                sent = await self.relay_once()
            except Exception as exc:  # the relay must outlive any failure; events wait in SQLite
                if isinstance(exc, Unavailable):
                    log.warning("outbox: Kafka unavailable (%s); retry in %d ms", exc, backoff_ms)
                else:
                    log.exception("outbox: relaying failed; retry in %d ms", backoff_ms)
                await self._sleep(backoff_ms)
                backoff_ms = min(backoff_ms * 2, self._max_backoff_ms)
                continue
            backoff_ms = self._retry_backoff_ms
            if sent == 0:
                await self._sleep(self._poll_interval_ms)

    async def relay_once(self) -> int:
        """Publish one batch of pending events; returns how many were sent."""
        entries = await asyncio.to_thread(self._metadata.pending_events, self._batch_size)
        if not entries:
            return 0
        await self._start_producer()
        for topic in dict.fromkeys(e.topic for e in entries):
            # Sent together, acknowledged together: per-key (model) order is kept by the
            # idempotent producer, and the batch is marked only once every ack is in.
            await self._producer.send_many(
                topic, [(e.key, e.event) for e in entries if e.topic == topic]
            )
        await asyncio.to_thread(self._metadata.mark_sent, [e.id for e in entries])
        self.sent += len(entries)
        return len(entries)

    async def check_kafka(self) -> None:
        """A readiness check: the broker the events go to answers. The producer is started
        lazily (the registry serves without Kafka), so the first check may start it."""
        await self._start_producer()
        await self._producer.ping()

    async def _start_producer(self) -> None:
        async with self._starting:
            if not self._producer_started:
                await self._producer.start()
                self._producer_started = True

    async def _sleep(self, ms: int) -> None:
        await set_within(self._wake, ms / 1000)
