"""The client side of stream inference, as a plain Kafka user would write it (integration tests,
chaos tests and bench/stream_infer.py): requests sent with a plain aiokafka producer, predictions
read with ``isolation_level=read_committed`` from where the topic ended before the requests went
out, counted per request id.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from maas import events
from maas.config import Settings
from maas.errors import DeadlineExceeded
from maas.topics import INFER, PREDICTIONS, Topic
from services.inference.kafka_stream import JSON_HEADERS
from services.inference.signature import datatype_of


def request_event(
    request_id: str,
    model: str,
    x: np.ndarray,
    *,
    version: str | None = None,
    reply_to: str | None = None,
    raw: bool = False,
) -> dict[str, Any]:
    """A ``maas.infer/1`` request for input ``x``: data as a list, or raw bytes (msgpack only)."""
    data: Any = np.ascontiguousarray(x).tobytes() if raw else x.ravel().tolist()
    tensor = {"name": "input", "datatype": datatype_of(x), "shape": list(x.shape), "data": data}
    event = events.new_event(events.INFER, id=request_id, model=model, inputs=[tensor])
    if version is not None:
        event["version"] = version
    if reply_to is not None:
        event["reply_to"] = reply_to
    return event


async def send_requests(
    settings: Settings, requests: Iterable[dict[str, Any]], *, as_json: bool = False
) -> int:
    """Send each request keyed by its id, JSON (with the content-type header) or msgpack."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, linger_ms=5)
    await producer.start()
    try:
        sends = []
        for event in requests:
            value = json.dumps(event).encode() if as_json else events.encode(event)
            headers = JSON_HEADERS if as_json else None
            sends.append(
                await producer.send(INFER.name, value, key=event["id"].encode(), headers=headers)
            )
        await asyncio.gather(*sends)
        return len(sends)
    finally:
        await producer.stop()


async def send_raw(settings: Settings, key: str, value: bytes) -> None:
    """One record as given (a malformed request)."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(INFER.name, value, key=key.encode())
    finally:
        await producer.stop()


class TopicReader:
    """Reads ``topic`` (read_committed) from where it ended at ``start()``, or from its start."""

    def __init__(
        self, settings: Settings, topic: Topic = PREDICTIONS, *, from_start: bool = False
    ) -> None:
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap,
            isolation_level="read_committed",
            enable_auto_commit=False,
        )
        self._partitions = [TopicPartition(topic.name, p) for p in range(topic.partitions)]
        self._from_start = from_start
        self.events: list[tuple[str | None, dict[str, Any]]] = []
        self.content_types: dict[str | None, str] = {}  # by key: the last record's

    async def start(self) -> None:
        await self._consumer.start()
        self._consumer.assign(self._partitions)
        if self._from_start:
            await self._consumer.seek_to_beginning(*self._partitions)
        else:
            await self._consumer.seek_to_end(*self._partitions)
        for tp in self._partitions:  # resolve the positions now, before anything is sent
            await self._consumer.position(tp)

    async def stop(self) -> None:
        await self._consumer.stop()

    async def __aenter__(self) -> TopicReader:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def poll(self) -> int:
        """Read what is there now; returns how many records came."""
        batches = await self._consumer.getmany(timeout_ms=200)
        for records in batches.values():
            for record in records:
                headers = [(k, bytes(v)) for k, v in record.headers or ()]
                key = None if record.key is None else record.key.decode()
                self.events.append((key, events.decode(record.value, headers)))
                self.content_types[key] = events.content_type(headers)
        return sum(len(records) for records in batches.values())

    def counts(self, ids: Iterable[str]) -> Counter[str]:
        wanted = set(ids)
        return Counter(key for key, _ in self.events if key in wanted)

    async def wait_for(self, ids: Sequence[str], timeout_s: float) -> Counter[str]:
        """Read until every id was seen at least once; DeadlineExceeded saying how many were."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while len(counts := self.counts(ids)) < len(set(ids)):
            if loop.time() > deadline:
                raise DeadlineExceeded(f"{len(counts)} of {len(set(ids))} ids seen in time")
            await self.poll()
        return counts

    async def drain(self) -> None:
        """Read up to the end the topic has now (every transaction on it settled)."""
        ends = await self._consumer.end_offsets(self._partitions)
        for tp, end in ends.items():
            while await self._consumer.position(tp) < end:
                await self.poll()
