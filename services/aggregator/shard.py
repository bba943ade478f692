"""An aggregator shard (``MAAS_AGGREGATOR_ROLE=shard``, index ``MAAS_AGGREGATOR_SHARD``).

It owns partition ``shard`` of every job that has that many shards, and runs the pure
``ShardCore`` between two Kafka edges: gradients in from partition ``shard % n`` of
``maas.gradients.v1``, parameter versions out on the same partition of ``maas.params.v1``.

Lifecycle of a job here:

1. **Activation**: the coordinator announces a job with a ``running`` status once its plan and
   every shard's version-0 checkpoint are in S3. The shard loads its checkpoint and publishes
   the parameters; workers start from there.
2. **Steps**: each gradient is offered to the core (sync quorum/deadline or async staleness;
   duplicates and stale ones are dropped there). Each new version is published at once.
3. **Checkpoints** every ``checkpoint_every`` versions, written off the event loop: data, then
   the ``LATEST.json`` pointer with the gradient offset a restart must replay from.
4. **Done**: the final version is published with ``final: true`` and checkpointed with
   ``final`` set in the pointer, which is what the coordinator waits for.

On start the shard resumes every job marked active in S3 from its pointer and replays the
gradient log from the earliest offset any of them needs; the core drops what it already applied.
Shard 0 also reports progress on ``maas.job-status.v1`` for the whole job.

No torch in this process: its memory is the partition, the optimizer state and one gradient sum.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from functools import partial

from prometheus_client import CollectorRegistry, Counter

from maas import events, topics
from maas.bus import EventProducer
from maas.config import Settings
from maas.errors import MaasError, NotFound
from maas.store import AsyncObjectStore
from maas.training import checkpoint as ck
from maas.training import protocol
from maas.training.aggregate import Contribution, ShardCore
from maas.training.codecs import parse_codec
from maas.training.plan import JobPlan
from maas.training.storage import TrainingStore
from maas.training.transport import (
    PartitionReader,
    RawRecord,
    dead_letter,
    decode,
    send_all,
    status_event,
)

log = logging.getLogger(__name__)

COORDINATOR_SERVICE = "training-coordinator"
TICK_S = 0.05


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.gradients = Counter(
            "maas_shard_gradients", "gradients by verdict", ["verdict"], registry=self.registry
        )
        self.versions = Counter("maas_shard_versions", "versions published", registry=self.registry)
        self.checkpoints = Counter(
            "maas_shard_checkpoints", "checkpoints written", registry=self.registry
        )


@dataclass
class ShardJob:
    plan: JobPlan
    core: ShardCore
    started_ms: int
    checkpointed_version: int
    assembler: protocol.PayloadAssembler = field(default_factory=protocol.PayloadAssembler)
    published_ms: int = 0
    reported_ms: int = 0
    writing: asyncio.Task[None] | None = None


class ShardService:
    def __init__(self, settings: Settings, shard: int) -> None:
        self.settings = settings
        self.shard = shard
        self.name = f"aggregator-{shard}"
        self.partition = protocol.partition_for(shard, topics.GRADIENTS.partitions)
        self.metrics = Metrics()
        self._producer = EventProducer(settings, client_id=self.name)
        self._objects = AsyncObjectStore(settings)
        self._store = TrainingStore(self._objects)
        self._gradients = PartitionReader(
            settings, topics.GRADIENTS, [self.partition], client_id=self.name
        )
        self._statuses = PartitionReader(
            settings, topics.JOB_STATUS, range(topics.JOB_STATUS.partitions), client_id=self.name
        )
        self.jobs: dict[str, ShardJob] = {}
        self._done: set[str] = set()
        self._activating: set[str] = set()  # announced twice while the first load awaits S3
        self._next_offset = 0

    # --- lifecycle --------------------------------------------------------------------------

    @property
    def metrics_registry(self) -> CollectorRegistry:
        return self.metrics.registry

    async def start(self) -> None:
        await self._producer.start()
        await self._objects.start()
        await self._gradients.start()
        await self._statuses.start()
        # Listen for new jobs before listing the active ones: none falls between the two.
        await self._statuses.from_now()
        offsets = []
        for job_id in await self._store.active_jobs():
            offset = await self._activate(job_id)
            if offset is not None:
                offsets.append(offset)
        if offsets:
            self._gradients.seek(self.partition, min(offsets))
            log.info(
                "%s resumed %d job(s); replaying gradients from offset %d",
                self.name,
                len(self.jobs),
                min(offsets),
            )
        else:
            await self._gradients.from_now()

    async def stop(self) -> None:
        for job in self.jobs.values():
            if job.writing is not None:
                await asyncio.gather(job.writing, return_exceptions=True)
        await self._statuses.stop()
        await self._gradients.stop()
        await self._objects.stop()
        await self._producer.stop()

    async def run(self) -> None:
        await asyncio.gather(self._read_gradients(), self._read_statuses(), self._tick())

    # --- activation -------------------------------------------------------------------------

    async def _read_statuses(self) -> None:
        while True:
            for raw in await self._statuses.next_batch(timeout_ms=200):
                try:
                    event = decode(raw, events.JOB_STATUS).event
                except MaasError:
                    continue  # not this reader's to judge; status readers skip what is malformed
                if event.get("service") == COORDINATOR_SERVICE and event["state"] == "running":
                    try:
                        await self._activate(event["job_id"])
                    except Exception:  # one job that cannot start must not stop the others
                        log.exception("%s: cannot start job %s", self.name, event["job_id"])

    async def _activate(self, job_id: str) -> int | None:
        """Load the job's checkpoint for this shard; the gradient offset to replay from."""
        if job_id in self.jobs or job_id in self._done or job_id in self._activating:
            return None
        self._activating.add(job_id)
        try:
            return await self._load(job_id)
        finally:
            self._activating.discard(job_id)

    async def _load(self, job_id: str) -> int | None:
        try:
            plan = await self._store.read_plan(job_id)
        except NotFound:
            log.warning("job %s is marked active but has no plan; skipping it", job_id)
            return None
        if self.shard >= plan.shards:
            self._done.add(job_id)
            return None
        pointer = await self._store.pointer(job_id, self.shard)
        if pointer is None:
            log.error("job %s has no checkpoint for shard %d; skipping it", job_id, self.shard)
            return None
        snap = await self._store.read_checkpoint(pointer)
        now = now_ms()
        core = ShardCore.restore(plan, self.shard, snap, now_ms=now)
        job = ShardJob(
            plan, core, started_ms=pointer.started_ms or now, checkpointed_version=pointer.version
        )
        self.jobs[job_id] = job
        log.info(
            "%s: job %s at version %d of %d (%d parameters)",
            self.name,
            job_id,
            core.version,
            plan.target_version,
            core.partition.size,
        )
        await self._publish(job)
        if core.done:
            await self._finish(job_id, job, already_final=pointer.final)
        if pointer.resume_offset is not None:
            return pointer.resume_offset
        return await self._gradients.offset_at(self.partition, pointer.written_ms)

    # --- gradients --------------------------------------------------------------------------

    async def _read_gradients(self) -> None:
        while True:
            for raw in await self._gradients.next_batch():
                self._next_offset = raw.offset + 1
                await self._on_gradient(raw)

    async def _on_gradient(self, raw: RawRecord) -> None:
        try:
            event = decode(raw, events.GRADIENT).event
        except MaasError as exc:
            await dead_letter(self._producer, raw, exc, self.name)
            return
        job = self.jobs.get(event["job_id"])
        if job is None or event["shard"] != self.shard:
            return  # another shard's (shared partition) or a job that is over
        core = job.core
        try:
            worker, version = int(event["worker"]), int(event["version"])
            assembled = job.assembler.add((worker, version), event, raw.offset)
            if assembled is None:
                return
            codec = parse_codec(event["codec"])
            contribution = Contribution(
                worker=worker,
                version=version,
                samples=int(event["num_samples"]),
                decode=partial(codec.decode, assembled.payload, core.partition.size),
                offset=assembled.first_offset,
                loss=event.get("loss"),
                accuracy=event.get("accuracy"),
            )
            before = core.version
            verdict = core.offer(contribution, now_ms())
        except MaasError as exc:
            await dead_letter(self._producer, raw, exc, self.name)
            return
        self.metrics.gradients.labels(verdict.value).inc()
        if core.version != before:
            await self._advanced(event["job_id"], job)

    async def _advanced(self, job_id: str, job: ShardJob) -> None:
        await self._publish(job)
        if job.core.done:
            await self._finish(job_id, job, already_final=False)
        elif job.core.version - job.checkpointed_version >= job.plan.training.checkpoint_every:
            self._checkpoint(job_id, job, final=False)

    async def _publish(self, job: ShardJob) -> None:
        core = job.core
        items = [
            (protocol.record_key(job.plan.job_id, self.shard), self.partition, event)
            for event in protocol.params_events(
                job_id=job.plan.job_id,
                shard=self.shard,
                version=core.version,
                values=core.theta,
                final=core.done,
                chunk_bytes=self.settings.codec_chunk_bytes,
                dtype=job.plan.broadcast_dtype,
            )
        ]
        job.published_ms = now_ms()
        await send_all(self._producer, topics.PARAMS, items)
        self.metrics.versions.inc()

    # --- checkpoints ------------------------------------------------------------------------

    def _checkpoint(self, job_id: str, job: ShardJob, *, final: bool) -> asyncio.Task[None] | None:
        if job.writing is not None and not job.writing.done():
            return None  # one write at a time; the next step will try again
        core = job.core
        # Encoded now, synchronously: the bytes are this version's even while the core moves on.
        data = ck.encode_snapshot(core.snapshot())
        pointer = ck.Pointer(
            version=core.version,
            key="",
            sha256="",
            resume_offset=core.resume_offset(self._next_offset),
            samples=core.stats.samples,
            started_ms=job.started_ms,
            written_ms=now_ms(),
            final=final,
        )
        job.checkpointed_version = core.version
        job.writing = asyncio.create_task(self._write(job_id, pointer, data))
        return job.writing

    async def _write(self, job_id: str, pointer: ck.Pointer, data: bytes) -> None:
        try:
            await self._store.write_checkpoint(job_id, self.shard, pointer.version, data, pointer)
        except MaasError as exc:
            log.warning(
                "checkpoint of %s at %d failed (%s); the next one will retry",
                job_id,
                pointer.version,
                exc.message,
            )
            return
        self.metrics.checkpoints.inc()
        if self.shard == 0 and not pointer.final:
            await self._status(job_id, "checkpointed", step=pointer.version)

    async def _finish(self, job_id: str, job: ShardJob, *, already_final: bool) -> None:
        """Write the final checkpoint (what the coordinator waits for) and forget the job."""
        if job.writing is not None:
            await asyncio.gather(job.writing, return_exceptions=True)
        if not already_final:
            while True:
                task = self._checkpoint(job_id, job, final=True)
                if task is not None:
                    await task
                pointer = await self._store.pointer(job_id, self.shard)
                if pointer is not None and pointer.final:
                    break
                await asyncio.sleep(1.0)  # S3 unavailable: the final checkpoint must land
        del self.jobs[job_id]
        self._done.add(job_id)
        log.info("%s: job %s done at version %d", self.name, job_id, job.core.version)

    # --- timers -----------------------------------------------------------------------------

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            now = now_ms()
            for job_id, job in list(self.jobs.items()):
                if job.core.tick(now):
                    await self._advanced(job_id, job)
                elif (
                    job.core.round_size < job.plan.workers
                    and now - job.published_ms >= self.settings.params_republish_ms
                ):
                    await self._publish(job)  # for workers that joined late or missed it
                if self.shard == 0 and now - job.reported_ms >= self.settings.progress_interval_ms:
                    await self._progress(job_id, job, now)

    async def _progress(self, job_id: str, job: ShardJob, now: int) -> None:
        window = job.core.stats.take_window()
        elapsed_s = max(1e-3, (now - (job.reported_ms or job.started_ms)) / 1000)
        job.reported_ms = now
        metrics = {k: v for k, v in window.items() if k in ("loss", "accuracy")}
        metrics["samples_per_s"] = window["samples"] / elapsed_s
        await self._status(
            job_id,
            "running",
            step=job.core.version,
            total_steps=job.plan.target_version,
            metrics=metrics,
        )

    async def _status(self, job_id: str, state: str, **fields: object) -> None:
        try:
            await self._producer.send(
                topics.JOB_STATUS,
                status_event(job_id, state, service=self.name, **fields),
                key=job_id,
            )
        except MaasError as exc:
            log.warning("status for %s not sent: %s", job_id, exc.message)
