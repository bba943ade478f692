"""The bus's guarantees under real faults, on a private broker of this module's own (the session's
broker and everyone else's consumers are never disturbed).

Producers reach the broker through a TCP proxy in front of its client listener; checks and
consumers use a second, direct listener. The proxy places a fault exactly where it hurts:
``hold_acks`` swallows the acknowledgements of written batches (as when the broker stops between
writing a batch and answering), ``cut`` makes the broker unreachable.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from kafka_offsets import start_group_at_end

from infra.bootstrap import ensure_topics, topic_plan
from infra.ephemeral import free_ports
from infra.kafka import KafkaBroker
from maas import events, topics
from maas.bus import ConsumerDied, EventProducer, Record
from maas.bus_consumer import EventConsumer
from maas.config import Settings
from maas.errors import InvalidArgument

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

HOST = "127.0.0.1"
PRODUCE_API_KEY = 0


@dataclass(frozen=True)
class ProxiedBroker(KafkaBroker):
    """The project's broker with its client listener advertised at the proxy's port and a second
    listener (DIRECT) that bypasses the proxy; inter-broker traffic takes the direct one."""

    direct_port: int = 0
    proxy_port: int = 0

    def server_properties(self) -> dict[str, str | int]:
        props = super().server_properties()
        props["listeners"] = (
            f"PLAINTEXT://{HOST}:{self.port},DIRECT://{HOST}:{self.direct_port},"
            f"CONTROLLER://{HOST}:{self.controller_port}"
        )
        props["advertised.listeners"] = (
            f"PLAINTEXT://{HOST}:{self.proxy_port},DIRECT://{HOST}:{self.direct_port}"
        )
        props["listener.security.protocol.map"] = (
            "PLAINTEXT:PLAINTEXT,DIRECT:PLAINTEXT,CONTROLLER:PLAINTEXT"
        )
        props["inter.broker.listener.name"] = "DIRECT"
        return props


class FaultyProxy:
    """Forwards Kafka frames between clients and the broker, and injects the faults."""

    def __init__(self, port: int, upstream_port: int) -> None:
        self.port = port
        self._upstream_port = upstream_port
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._holding = False
        self._cut = False
        self.forwarded_produce_acks = 0
        self.held_produce_acks = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, HOST, self.port)

    async def stop(self) -> None:
        self._close_all()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def hold_acks(self) -> None:
        """From now on, no answer to a produce request reaches its producer (others pass)."""
        self._holding = True

    def release_acks(self) -> None:
        self._holding = False

    @contextlib.contextmanager
    def cut(self) -> Iterator[None]:
        """The broker is unreachable inside: connections drop, new ones are closed at once."""
        self._cut = True
        self._close_all()
        try:
            yield
        finally:
            self._cut = False

    def _close_all(self) -> None:
        for writer in list(self._writers):
            writer.close()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        if self._cut:
            client_w.close()
            return
        try:
            broker_r, broker_w = await asyncio.open_connection(HOST, self._upstream_port)
        except OSError:
            client_w.close()
            return
        self._writers |= {client_w, broker_w}
        produce_versions: dict[bytes, int] = {}  # correlation id -> version of a produce request

        def request(frame: bytes) -> bool:
            if int.from_bytes(frame[:2], "big") == PRODUCE_API_KEY:
                produce_versions[frame[4:8]] = int.from_bytes(frame[2:4], "big")
            return True

        def answer(frame: bytes) -> bool:
            version = produce_versions.pop(frame[:4], None)
            if version is None or not _is_ack(frame, version):
                return True  # not an answer to a produce request, or an error (nothing written)
            if self._holding:
                self.held_produce_acks += 1
                return False
            self.forwarded_produce_acks += 1
            return True

        pumps = [
            asyncio.create_task(_pump(client_r, broker_w, request)),
            asyncio.create_task(_pump(broker_r, client_w, answer)),
        ]
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for task in pumps:
            task.cancel()
        for writer in (client_w, broker_w):
            writer.close()
            self._writers.discard(writer)


def _is_ack(answer: bytes, version: int) -> bool:
    """Whether a produce answer says its (first) batch was written: error code 0."""
    # Produce answers up to version 8 are not "flexible": correlation id, topic count, topic
    # name (int16 length + bytes), partition count, partition index, then the error code.
    assert version <= 8, f"produce answer version {version}: teach _is_ack its layout"
    at = 10 + int.from_bytes(answer[8:10], "big") + 8
    return int.from_bytes(answer[at : at + 2], "big", signed=True) == 0


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, keep) -> None:
    """Copy size-prefixed Kafka frames until either side closes; ``keep(frame)`` may drop one."""
    with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
        while True:
            head = await reader.readexactly(4)
            frame = await reader.readexactly(int.from_bytes(head, "big"))
            if keep(frame):
                writer.write(head + frame)
                await writer.drain()


@dataclass
class FaultyKafka:
    broker: ProxiedBroker
    proxy: FaultyProxy
    direct: Settings  # consumers and checks: never faulted
    proxied: Settings  # producers: through the proxy

    async def stop_broker(self) -> None:
        await asyncio.to_thread(self.broker.stop)

    async def start_broker(self) -> None:
        self.broker.start(wait=False)  # in this thread: the broker dies with its parent thread
        await asyncio.to_thread(self.broker.wait_ready, timeout_s=120)


@pytest.fixture(scope="module")
async def kafka(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[FaultyKafka]:
    port, direct_port, controller_port, proxy_port = free_ports(4)
    state = Path(tmp_path_factory.mktemp("bus-faults"))
    base = Settings.from_env().replace(state_dir=str(state), kafka_security_protocol="PLAINTEXT")
    direct = base.replace(kafka_bootstrap=f"{HOST}:{direct_port}")
    broker = ProxiedBroker(
        **vars(
            KafkaBroker.from_settings(
                base.replace(kafka_bootstrap=f"{HOST}:{port}"), controller_port=controller_port
            )
        ),
        direct_port=direct_port,
        proxy_port=proxy_port,
    )
    proxy = FaultyProxy(proxy_port, port)
    await proxy.start()
    faulty = FaultyKafka(
        broker, proxy, direct, base.replace(kafka_bootstrap=f"{HOST}:{proxy_port}")
    )
    try:
        await faulty.start_broker()
        await ensure_topics(direct, topic_plan(direct))
        yield faulty
    finally:
        await proxy.stop()
        broker.stop()


def status_event(job_id: str, step: int = 0) -> dict:
    return events.new_event(events.JOB_STATUS, job_id=job_id, state="running", step=step)


async def eventually(check, what: str, timeout_s: float = 60.0) -> None:
    """Wait until ``check()`` (a plain or an async predicate) holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not await _holds(check()):
        assert loop.time() < deadline, f"{what}: not reached in {timeout_s} s"
        await asyncio.sleep(0.1)


async def _holds(value) -> bool:
    return bool(await value) if inspect.isawaitable(value) else bool(value)


async def read_key(settings: Settings, topic: topics.Topic, key: str) -> list[dict]:
    """Every event keyed ``key`` on ``topic``, start to end (a throw-away reader, no group)."""
    reader = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False)
    await reader.start()
    try:
        parts = [TopicPartition(topic.name, p) for p in range(topic.partitions)]
        reader.assign(parts)
        await reader.seek_to_beginning(*parts)
        ends = await reader.end_offsets(parts)
        found: list[dict] = []
        while await _behind(reader, ends):
            for raws in (await reader.getmany(timeout_ms=1000)).values():
                found += [events.decode(r.value) for r in raws if r.key == key.encode()]
        return found
    finally:
        await reader.stop()


async def _behind(reader: AIOKafkaConsumer, ends: dict[TopicPartition, int]) -> bool:
    positions = [await reader.position(tp) for tp in ends]
    return any(position < end for position, end in zip(positions, ends.values(), strict=True))


async def test_idempotent_sends_are_written_once_when_the_broker_dies_mid_batch(kafka):
    """The broker stops (SIGTERM) after writing a batch whose acknowledgement the producer never
    got: the producer sends it again after the restart, and idempotence makes the broker drop
    the copy.

    Checked able to fail: with ``enable_idempotence=False`` in ``EventProducer.start`` the batch
    is written twice and ``steps`` holds ~109 events twice (4 runs of 4). The earlier version of
    this test (stopping the broker 0.2 s into the sends) passed without idempotence 3 of 3: every
    batch was acknowledged before the broker went down."""
    key = f"mid-batch-{uuid.uuid4().hex[:8]}"
    count = 3_000  # about twenty produce requests: the fault lands in the middle
    sent = [(key, status_event(key, step=i)) for i in range(count)]
    # A long request timeout so that, without idempotence, nothing expires: it is duplicated.
    async with EventProducer(kafka.proxied, client_id="mid-batch", request_timeout_ms=120_000) as p:
        sending = asyncio.create_task(p.send_many(topics.JOB_STATUS, sent))
        await eventually(lambda: kafka.proxy.forwarded_produce_acks > 0, "a first ack")
        kafka.proxy.hold_acks()
        try:
            await eventually(lambda: kafka.proxy.held_produce_acks > 0, "a batch written, unacked")
            await kafka.stop_broker()
        finally:
            kafka.proxy.release_acks()
        await kafka.start_broker()
        await asyncio.wait_for(sending, 120)
    steps = [e["step"] for e in await read_key(kafka.direct, topics.JOB_STATUS, key)]
    assert steps == list(range(count))  # one partition per key: in order, each exactly once


async def committed(settings: Settings, group_id: str, tp: TopicPartition) -> int | None:
    """The group's committed offset on ``tp`` (None: nothing committed), read without joining."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group_id, partitions=[tp])
    finally:
        await admin.close()
    found = offsets.get(tp)
    return None if found is None or found.offset < 0 else found.offset


@dataclass
class Refusing:
    """A consumer (direct) that refuses every record keyed ``key``: each must reach the DLQ,
    written by a producer behind the proxy."""

    kafka: FaultyKafka
    key: str
    feeder: EventProducer
    loop: asyncio.Task[None]

    @property
    def group(self) -> str:
        return f"g-{self.key}"

    async def send_bad(self) -> tuple[TopicPartition, int]:
        sent = await self.feeder.send(topics.JOB_STATUS, status_event(self.key), key=self.key)
        return TopicPartition(sent.topic, sent.partition), sent.offset

    async def committed(self, tp: TopicPartition) -> int | None:
        return await committed(self.kafka.direct, self.group, tp)

    async def letters(self, tp: TopicPartition, offset: int) -> list[dict]:
        """The DLQ's letters for the record at ``tp``@``offset``."""
        found = await read_key(self.kafka.direct, topics.DLQ, self.key)
        return [e for e in found if (e["partition"], e["offset"]) == (tp.partition, offset)]


@contextlib.asynccontextmanager
async def refusing(kafka: FaultyKafka, *, dlq_max_attempts: int) -> AsyncIterator[Refusing]:
    """A running ``Refusing`` whose DLQ writer has dead-lettered one record already, and whose
    consumer committed past it (it knows where the DLQ is, as a producer of a running service
    does)."""
    key = f"refused-{uuid.uuid4().hex[:8]}"
    await start_group_at_end(kafka.direct, topics.JOB_STATUS, f"g-{key}")

    async def refuse(record: Record) -> None:
        if record.key == key:
            raise InvalidArgument("refused: goes to the DLQ")

    settings = kafka.direct.replace(dlq_max_attempts=dlq_max_attempts)
    async with (
        EventProducer(kafka.direct, client_id="feeder") as feeder,
        EventProducer(kafka.proxied, client_id="dlq-writer") as dlq_writer,
    ):
        consumer = EventConsumer(
            settings,
            topics=[topics.JOB_STATUS],
            group_id=f"g-{key}",
            handler=refuse,
            producer=dlq_writer,
            retry_backoff_ms=50,
            dlq_timeout_s=1.0,
        )
        await consumer.start()
        case = Refusing(kafka, key, feeder, asyncio.create_task(consumer.run()))
        try:
            first = await case.send_bad()
            await eventually(lambda: case.letters(*first), "the first dead letter")

            async def committed_past_first() -> bool:
                return await case.committed(first[0]) == first[1] + 1

            await eventually(committed_past_first, "the commit past the first record")
            yield case
        finally:
            await consumer.stop()
            await asyncio.gather(case.loop, return_exceptions=True)


def failed_dlq_writes(caplog: pytest.LogCaptureFixture) -> int:
    return sum(r.getMessage().startswith("DLQ write failed") for r in caplog.records)


async def test_a_record_stays_uncommitted_while_the_dlq_is_unreachable(kafka, caplog):
    """Its offset is committed only once its dead letter is written: nothing is lost while the
    DLQ cannot be reached, and the letter is there once it can."""
    async with refusing(kafka, dlq_max_attempts=100) as case:
        with kafka.proxy.cut():
            tp, offset = await case.send_bad()
            await eventually(lambda: failed_dlq_writes(caplog) >= 1, "a failed DLQ write")
            assert await case.committed(tp) == offset  # the consumer waits at the record
            assert await case.letters(tp, offset) == []
            await eventually(lambda: failed_dlq_writes(caplog) >= 3, "the write tried again")
            assert not case.loop.done()  # retrying, not dead

        async def moved_on() -> bool:
            return await case.committed(tp) == offset + 1

        await eventually(moved_on, "the commit past the record")
        assert len(await case.letters(tp, offset)) == 1  # written once, though tried many times


async def test_a_dlq_that_stays_unreachable_stops_the_consumer_instead_of_hanging(kafka):
    """Every DLQ write waits a bounded time for its acknowledgement: after
    ``dlq_max_attempts`` the loop stops saying why (its service turns NOT_SERVING), with the
    record still uncommitted for the next consumer of the group."""
    async with refusing(kafka, dlq_max_attempts=3) as case:
        with kafka.proxy.cut():
            tp, offset = await case.send_bad()
            with pytest.raises(ConsumerDied, match=r"3 times in a row.*stays uncommitted"):
                await asyncio.wait_for(asyncio.shield(case.loop), 60)
            assert await case.committed(tp) == offset
