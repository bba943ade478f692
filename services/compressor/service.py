"""Kafka edge of the compressor: jobs from ``maas.jobs.v1`` into the core, statuses out; and
``registered`` events from ``maas.models.v1`` into the promoter (model policies).

The compressor has its own consumer group, so it sees every job alongside the trainer and
ignores the types that are not ``compress``. A job the core refuses (bad methods, missing or
tampered parent) goes to the DLQ via the bus, and ``on_dead_letter`` tells the client with a
``failed`` status naming the reason.

``cancel`` job events are also read by a group-less reader of the jobs topic: the job consumer
handles one job at a time, so a cancel queued behind the job it names would arrive only once
that job is over. The reader starts at the beginning of what the topic retains and has read to
its end before the job consumer starts, so a cancel sent while no compressor ran still stops
the job it names.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

from aiokafka import TopicPartition
from prometheus_client import CollectorRegistry, Counter

from maas import datasets, events, job_ids, jobs
from maas.bus import DeadLetter, EventProducer, Record
from maas.bus_consumer import EventConsumer
from maas.bus_reader import PartitionReader
from maas.config import Settings
from maas.errors import AlreadyExists, MaasError, SchemaViolation
from maas.liveness import Liveness
from maas.policy import is_plan_id, policy_job_id
from maas.recent import RecentKeys
from maas.registry.client import RegistryClient
from maas.registry.types import ModelVersion
from maas.store_async import AsyncObjectStore
from maas.topics import JOB_STATUS, JOBS, MODELS
from services.compressor.core import Compressor
from services.compressor.job import JOB_TYPE, failed_status, status
from services.compressor.promoter import Promoter

log = logging.getLogger(__name__)

GROUP_ID = "maas-compressor"
POLICY_GROUP_ID = "maas-compressor-policies"
REMEMBERED_QUEUED = 10_000  # job ids told `queued`, kept so a redelivery is not told twice


class Metrics:
    """Prometheus counters; a registry of its own so tests can build several services."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.jobs = Counter(
            "maas_compress_jobs", "compress jobs by outcome", ["outcome"], registry=self.registry
        )
        self.variants = Counter(
            "maas_compress_variants",
            "variants registered by method",
            ["method", "format"],
            registry=self.registry,
        )
        self.promotions = Counter(
            "maas_policy_promotions",
            "policy evaluations by outcome (moved: an alias moved or stayed on the pick; none: "
            "no candidate qualified, or the alias stays; failed: the move could not be made)",
            ["outcome"],
            registry=self.registry,
        )


class CompressorService:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.metrics = Metrics()
        self._producer = EventProducer(settings, client_id="compressor")
        self._registry = RegistryClient(settings, actor="compressor")
        self._objects = AsyncObjectStore(settings, threads=1)  # job id claims, and datasets
        # The core reads datasets on its worker thread, where the blocking store is right.
        self.core = Compressor(
            self._registry,
            self._publish,
            datasets.fetcher(self._objects.sync, settings),
            settings=settings,
            on_registered=self._registered,
            claim=functools.partial(job_ids.claim, self._objects),
        )
        self._consumer = EventConsumer(
            settings,
            topics=[JOBS],
            group_id=GROUP_ID,
            handler=self._handle,
            producer=self._producer,
            expected_schemas=[events.JOB],
            on_dead_letter=self._failed,
            # S3 or the registry away: ~15 s of retries, then the job fails with the reason.
            retry_backoff_ms=1000,
            # A job runs between two fetches: past this the group gives its partition away.
            max_poll_interval_ms=settings.compressor_max_poll_interval_ms,
        )
        self.promoter = Promoter(self._registry, self.core)
        self._policies = EventConsumer(
            settings,
            topics=[MODELS],
            group_id=POLICY_GROUP_ID,
            handler=self._on_model_event,
            producer=self._producer,
            expected_schemas=[events.MODEL],
            on_dead_letter=self._policy_failed,
            retry_backoff_ms=1000,
        )
        self._cancels = PartitionReader(
            settings, JOBS, range(JOBS.partitions), client_id="compressor-cancels"
        )
        self.liveness = Liveness(self.metrics.registry)
        self.liveness.dependencies.add_kafka_and_s3(self._producer, settings)
        self.liveness.dependencies.add("registry", self._registry.ping)
        self._running = ""  # the id of the job the jobs consumer is running, if any
        self._waiting_noted: tuple[str, int] | None = None  # (job id, when) of the last note
        self._announced = RecentKeys(REMEMBERED_QUEUED)  # told `queued` already

    @property
    def metrics_registry(self) -> CollectorRegistry:
        return self.metrics.registry

    async def start(self) -> None:
        await self._objects.start()
        await self._producer.start()
        await self._registry.start()
        await self._cancels.start()
        await self._cancels.from_beginning()
        await self._read_cancels_until(await self._cancels.end_offsets())
        await self._consumer.start()
        await self._policies.start()

    async def run(self) -> None:
        # A consumer that dies (the DLQ unwritable for long) leaves the process up with
        # maas_loop_up{loop="jobs-consumer"} 0 and the reason logged, not in a restart loop.
        await asyncio.gather(
            self.liveness.supervise("jobs-consumer", self._consumer.run()),
            self.liveness.supervise("policies-consumer", self._policies.run()),
            self.liveness.supervise("cancel-reader", self._read_cancels()),
        )

    async def stop(self) -> None:
        await self._policies.stop()
        await self._consumer.stop()
        await self._cancels.stop()
        await self._registry.stop()
        await self._producer.stop()
        await self._objects.stop()

    async def _publish(self, event: dict[str, object]) -> None:
        await self._producer.send(JOB_STATUS, event, key=str(event["job_id"]))

    async def _handle(self, record: Record) -> None:
        self._running = str(record.event.get("job_id", ""))
        try:
            versions = await self.core.handle(record.event)
        except MaasError as exc:
            if exc.retriable and record.event.get("type") == JOB_TYPE:
                await self._note_waiting(self._running, exc)
            raise  # the consumer redelivers it; the job resumes after its registered variants
        finally:
            self._running = ""
        if versions:
            self.metrics.jobs.labels("succeeded").inc()

    async def _note_waiting(self, job_id: str, exc: MaasError) -> None:
        """Say in the job's status what it waits for (S3, the registry) while its event is
        retried, once per ``jobs.WAITING_NOTE_MS``: only the log said so. Only news: one that
        cannot be sent (Kafka away too) is dropped."""
        now = events.now_ms()
        noted = self._waiting_noted
        if noted is not None and noted[0] == job_id and now - noted[1] < jobs.WAITING_NOTE_MS:
            return
        self._waiting_noted = (job_id, now)
        try:
            await self._publish(status(job_id, "running", reason=jobs.waiting_reason(exc)))
        except MaasError as error:
            log.warning("job %s: status not sent (%s)", job_id, error.message)

    def _registered(self, version: ModelVersion) -> None:
        self.metrics.variants.labels(version.method or "", version.format).inc()

    async def _read_cancels(self) -> None:
        while True:
            await self._next_cancels(announce_queued=True)

    async def _read_cancels_until(self, end: dict[TopicPartition, int]) -> None:
        while not await self._cancels.reached(end):
            await self._next_cancels(announce_queued=False)
        log.info("cancels read up to %s", {tp.partition: offset for tp, offset in end.items()})

    async def _next_cancels(self, *, announce_queued: bool) -> None:
        """Cancels, read off every job event as it is published; with ``announce_queued``, a
        compress job arriving while another runs is told ``queued`` behind it (the jobs
        consumer reads it only once the running one is over: it had no status till then)."""
        for record in await self._cancels.next_records([events.JOB], 500):
            job_id, kind = str(record.event["job_id"]), record.event["type"]
            if kind == jobs.CANCEL:
                self.core.cancel(job_id)
            elif kind == JOB_TYPE and announce_queued and self._waits(job_id):
                self._announced.add(job_id)
                await self._announce_queued(job_id, record.event)

    async def _announce_queued(self, job_id: str, event: dict[str, Any]) -> None:
        reason = (
            f"waiting for compress job {self._running} to finish: the compressor runs one job "
            "at a time"
        )
        try:
            # Under an id another job holds, its status stream is that job's: this one is
            # refused when its turn comes (already_exists, to the DLQ), and says nothing there.
            if await job_ids.held_by_another(self._objects, job_id, jobs.content_sha256(event)):
                return
            await self._publish(status(job_id, "queued", reason=reason))
        except Exception as exc:  # advisory: a Kafka or S3 outage must not end the cancel reader
            log.warning("could not tell job %s it is queued: %s", job_id, exc)

    def _waits(self, job_id: str) -> bool:
        """Whether ``job_id`` waits behind another job (not run, not running, not told yet)."""
        running = self._running
        return (
            bool(running)
            and not is_plan_id(job_id)  # a plan's id: refused at intake, its stream not ours
            and job_id != running
            and job_id not in self._announced
            and (not self.core.done(job_id))
        )

    async def _on_model_event(self, record: Record) -> None:
        decision = await self.promoter.handle(record.event)
        if decision is not None:
            self.metrics.promotions.labels("moved" if decision.version else "none").inc()

    async def _policy_failed(self, letter: DeadLetter) -> None:
        """A policy's plan (or its promotion, which comes before its job says succeeded) that
        cannot be made fails its job id, so a watcher learns why."""
        event = letter.event or {}
        if event.get("event") == "registered" and "version" in event:
            job_id = policy_job_id(str(event["name"]), int(event["version"]))
            self.metrics.promotions.labels("failed").inc()
            await self._publish(failed_status(job_id, letter.code, letter.message))

    async def _failed(self, letter: DeadLetter) -> None:
        job = _job_of(letter)
        # Every job consumer sees every job; only the one whose type it is reports on it.
        if job.get("type") != JOB_TYPE:
            return
        job_id = job.get("job_id") or letter.key
        if letter.code == AlreadyExists.reason_code or is_plan_id(job_id):
            return  # the id is another job's: its status stream is not this event's to write
        self.metrics.jobs.labels("failed").inc()
        if job_id:
            await self._publish(failed_status(str(job_id), letter.code, letter.message))


def _job_of(letter: DeadLetter) -> dict[str, Any]:
    """The dead-lettered job as far as it decodes (schema violations arrive undecoded)."""
    if letter.event is not None:
        return letter.event
    try:
        return events.decode(letter.value, letter.headers)
    except SchemaViolation:
        return {}
