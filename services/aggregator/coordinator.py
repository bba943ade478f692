"""The training coordinator (``MAAS_AGGREGATOR_ROLE=coordinator``, one replica).

It is the only consumer of training jobs (group ``maas-training``) and the only writer of their
``accepted``/``succeeded``/``failed``/``cancelled`` states. Per job:

1. **Intake** (the job consumer's handler): skip types that are not ``train``/``finetune``; check
   the job (``maas.jobs.check_job``, then ``prepare_job``: arch, data fit, limits, finetune base
   from the registry). A bad job raises, so the bus dead-letters it and ``on_dead_letter``
   publishes ``failed`` with the reason. A good one is written to S3 — starting weights, every
   partition's version-0 checkpoint, the plan, then the ``active`` marker — and handed to the pool.
   Idempotent by ``job_id``: a job whose plan or result is already in S3 is not run again; a
   different job under a used ``job_id`` is dead-lettered (``already_exists``) with no status,
   since the status stream under that id is the first job's.
2. **Pool** (``maas.training.pool``, fed by the members' heartbeats on the control topic): a job
   is ``queued`` (with the reason) until enough gradient workers are free, then assigned ranks and
   partitions; the assignment goes to S3 and the control topic (members act on it) and the status
   says ``running``. Members that go silent lose their part; free ones fill vacant ranks; a
   partition whose shard is gone moves to a live one. Every change is in the job's status.
3. **Monitor** (``monitor.JobMonitor``): poll the partitions' checkpoint pointers; when every
   one is final, finish. A job whose shards show no progress for ``MAAS_JOB_STALL_TIMEOUT_MS``
   fails (no workers?). A job ends early, at the next poll, when a worker reports a step it
   cannot compute (``failed`` with its error), an assignment this coordinator did not write
   takes its members (``failed``, naming it), or a ``cancel`` job event names it
   (``cancelled``; a queued job at once).
4. **Finish** (``finish.JobFinisher``): assemble the final parameters from the shards' final
   checkpoints, evaluate on the held-out split, register (lineage: job id, and the base for a
   finetune; metrics accuracy, loss, samples/s; alias if asked); then write ``result.json``,
   publish ``succeeded``, clear the marker, release the job's members. A registration that
   already happened (crash before the result was written) is found by job id and not repeated.

On start it resumes every job still marked active, with its assignment from S3. It runs torch
(planning and evaluation) on worker threads; shards never do.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from safetensors.torch import save as save_safetensors

from maas import datasets, events, job_ids, jobs, topics
from maas.artifacts import materialize
from maas.bus import DeadLetter, EventProducer, Record
from maas.bus_consumer import EventConsumer, dead_letter_group
from maas.bus_reader import PartitionReader
from maas.config import Settings
from maas.errors import AlreadyExists, FailedPrecondition, InvalidArgument, SchemaViolation
from maas.liveness import Liveness
from maas.policy import is_plan_id
from maas.registry.client import RegistryClient
from maas.store_async import AsyncObjectStore
from maas.training import checkpoint as ck
from maas.training.plan import JobPlan
from maas.training.prepare import (
    TRAINING_TYPES,
    BaseModel,
    Limits,
    PreparedJob,
    prepare_job,
)
from maas.training.storage import TrainingStore
from services.aggregator.finish import JobFinisher
from services.aggregator.monitor import JobMonitor
from services.aggregator.scheduler import SERVICE as COORDINATOR_SERVICE
from services.aggregator.scheduler import PoolScheduler

log = logging.getLogger(__name__)

GROUP_ID = "maas-training"
STATUS_GROUP_ID = "maas-job-status"  # dead-letters the statuses no reader can read


class Coordinator:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics_registry = CollectorRegistry()
        self._outcomes = Counter(
            "maas_training_jobs",
            "training jobs by outcome",
            ["outcome"],
            registry=self.metrics_registry,
        )
        self.liveness = Liveness(self.metrics_registry)  # its loops' crash ends the process
        self._producer = EventProducer(settings, client_id=COORDINATOR_SERVICE)
        self.liveness.dependencies.add_kafka_and_s3(self._producer, settings)
        self._objects = AsyncObjectStore(settings)
        self._store = TrainingStore(self._objects)
        self._registry = RegistryClient(settings, actor=COORDINATOR_SERVICE)
        self.liveness.dependencies.add("registry", self._registry.ping)
        self._finisher = JobFinisher(settings, self._objects, self._store, self._registry)
        self._jobs = EventConsumer(
            settings,
            topics=[topics.JOBS],
            group_id=GROUP_ID,
            handler=self._handle,
            producer=self._producer,
            expected_schemas=[events.JOB],
            on_dead_letter=self._dead_letter,
        )
        self._statuses = PartitionReader(
            settings,
            topics.JOB_STATUS,
            range(topics.JOB_STATUS.partitions),
            client_id=COORDINATOR_SERVICE,
        )
        self._status_letters = dead_letter_group(
            settings,
            topics.JOB_STATUS,
            group_id=STATUS_GROUP_ID,
            producer=self._producer,
            expected_schemas=[events.JOB_STATUS],
        )
        self._monitor = JobMonitor(
            settings,
            self._store,
            finish=self._finish,
            announce=self._announce,
            send_status=self._send_status,
            check_base=self._finisher.check_base,
        )
        self._pool = PoolScheduler(
            settings,
            self._producer,
            self._store,
            self._monitor.follow,
            self._member_failed,
            self.metrics_registry,
        )

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        await self._producer.start()
        await self._objects.start()
        await self._registry.start()
        await self._statuses.start()
        await self._statuses.from_now()
        await self._pool.start()
        for job_id in await self._store.active_jobs():
            log.info("resuming job %s", job_id)
            await self._resume(job_id)
        await self._jobs.start()
        await self._status_letters.start()

    async def stop(self) -> None:
        await self._status_letters.stop()
        await self._jobs.stop()
        await self._monitor.stop()
        await self._pool.stop()
        await self._statuses.stop()
        await self._registry.stop()
        await self._objects.stop()
        await self._producer.stop()

    async def run(self) -> None:
        await asyncio.gather(
            self._jobs.run(),
            self._status_letters.run(),
            self._pool.run(),
            self._watch_progress(),
        )

    async def _resume(self, job_id: str) -> None:
        if await self._store.read_result(job_id) is not None:
            self._monitor.follow(job_id)  # finished; only announcing it is left
            return
        await self._pool.submit(await self._store.read_plan(job_id))

    async def _send_status(self, job_id: str, state: str, **fields: Any) -> None:
        event = jobs.status_event(job_id, state, service=COORDINATOR_SERVICE, **fields)
        await self._producer.send(topics.JOB_STATUS, event, key=job_id)

    # --- intake -----------------------------------------------------------------------------

    async def _handle(self, record: Record) -> None:
        job = record.event
        if job["type"] == jobs.CANCEL:
            await self._cancel(job["job_id"])
            return
        if job["type"] not in TRAINING_TYPES:
            return  # compress jobs are the compressor's
        job_id = job["job_id"]
        planned = await self._store.has_plan(job_id)
        if planned:
            await self._check_same_job(job)
        if await self._store.read_result(job_id) is not None:
            log.info("job %s already ran; ignoring the redelivery", job_id)
            return
        if planned:
            # Accepted before a crash: whatever step was cut short is redone (all idempotent).
            if not self._monitor.following(job_id) and job_id not in self._pool.pool.queue:
                await self._store.mark_active(job_id)
                await self._resume(job_id)
            return
        content = jobs.job_content(job)  # before checking, which may fill in defaults
        jobs.check_job(job, self.settings)
        prepared = await self._prepare(job)
        plan = prepared.plan
        await job_ids.claim(self._objects, job_id, job["type"], jobs.content_sha256(content))
        await self._send_status(
            job_id,
            "accepted",
            step=0,
            total_steps=plan.target_version,
            content_sha256=jobs.content_sha256(content),
        )
        await self._write_job(content, prepared)
        log.info(
            "job %s: %s %s, %d steps, %d workers x %d shards (%s, %s)",
            job_id,
            plan.kind,
            plan.arch,
            plan.total_steps,
            plan.workers,
            plan.shards,
            plan.training.mode,
            plan.training.gradient_codec,
        )
        await self._pool.submit(plan)

    async def _check_same_job(self, job: Mapping[str, Any]) -> None:
        """A redelivery (or a client's retry) of an accepted job is a no-op; another job under
        the same id is refused: its status would mix with the first one's."""
        kept = await self._store.read_job_content(job["job_id"])
        if kept is not None and kept != jobs.job_content(job):
            raise AlreadyExists(
                f"job_id={job['job_id']!r} belongs to another job, accepted earlier with other "
                "content; send this one under a new job_id"
            )

    async def _prepare(self, job: Mapping[str, Any]) -> PreparedJob:
        base = await self._load_base(job["base"]) if job["type"] == "finetune" else None
        limits = Limits.from_settings(self.settings)
        return await asyncio.to_thread(
            prepare_job,
            job,
            limits=limits,
            fetch_dataset=datasets.fetcher(self._objects.sync, self.settings),
            load_base=(lambda _: base) if base is not None else None,
        )

    async def _load_base(self, base: Mapping[str, Any]) -> BaseModel:
        selector = base.get("version", base.get("alias"))
        ref = f"{base['name']}@{selector}" if selector is not None else str(base["name"])
        version, manifest, files = await self._registry.fetch(ref)
        if manifest.format != "dense":
            raise InvalidArgument(
                f"base {ref} is stored as {manifest.format!r}; finetune needs a dense version "
                "(the one a train job registered, not a compressed variant)"
            )
        module = await asyncio.to_thread(materialize, manifest, files)
        return BaseModel(
            module, manifest.arch, dict(manifest.config), version.name, version.version
        )

    async def _write_job(self, content: Mapping[str, Any], prepared: PreparedJob) -> None:
        plan = prepared.plan
        job_id = plan.job_id
        await self._store.write_job_content(job_id, content)
        await self._store.write_init(job_id, save_safetensors(prepared.state))
        flat = plan.layout.flatten({n: prepared.state[n].numpy() for n in plan.layout.names})
        written = events.now_ms()
        for part in plan.partitions:
            data = ck.encode_snapshot(ck.initial_snapshot(part.gather(flat)))
            pointer = ck.Pointer(version=0, key="", sha256="", written_ms=written)
            await self._store.write_checkpoint(job_id, part.shard, 0, data, pointer)
        # The plan makes a redelivery a no-op and the marker makes a restart resume: both last.
        await self._store.write_plan(plan)
        await self._store.mark_active(job_id)

    async def _dead_letter(self, letter: DeadLetter) -> None:
        job = letter.event
        if job is None:
            try:
                job = events.decode(letter.value, letter.headers)
            except SchemaViolation:
                return  # not even a map: there is no job id to report on
        # Every job consumer sees every job: report on ours, and on ones of no valid type. A bad
        # cancel event is no reason to call the job it names failed: its reason is in the DLQ.
        if job.get("type") in ("compress", jobs.CANCEL) or not isinstance(job.get("job_id"), str):
            return
        if letter.code == AlreadyExists.reason_code or is_plan_id(job["job_id"]):
            return  # the id is another job's: its status stream is not this event's to write
        await self._send_status(
            job["job_id"], "failed", error={"code": letter.code, "message": letter.message}
        )
        self._outcomes.labels("failed").inc()

    # --- monitor ----------------------------------------------------------------------------

    async def _watch_progress(self) -> None:
        while True:
            for record in await self._statuses.next_records([events.JOB_STATUS], 500):
                event = record.event
                if event.get("service") != COORDINATOR_SERVICE:
                    self._monitor.shard_reported(event)
                    self._pool.worker_report(event)

    def _member_failed(self, job_id: str, why: str) -> None:
        log.warning("job %s: %s", job_id, why)
        failed = {
            "state": "failed",
            "error": {"code": FailedPrecondition.reason_code, "message": why},
        }
        self._monitor.end(job_id, failed)
        if job_id in self._pool.pool.queue:
            self._monitor.follow(job_id)  # a queued job has no monitor yet to take the ending

    async def _cancel(self, job_id: str) -> None:
        if not await self._store.has_plan(job_id) or await self._store.read_result(job_id):
            log.info(
                "job %s: cancel ignored (no training job of that id is queued or running)", job_id
            )
            return
        cancelled = {"state": "cancelled", "reason": "a cancel event asked for it"}
        # Written first, so a restart before the announcement still ends the job as cancelled.
        await self._store.write_result(job_id, cancelled)
        if self._monitor.following(job_id):
            self._monitor.end(job_id, cancelled)
        else:
            await self._announce(job_id, cancelled)  # queued: nothing runs it yet

    # --- finish -----------------------------------------------------------------------------

    async def _finish(self, plan: JobPlan, pointers: list[ck.Pointer]) -> None:
        result = await self._finisher.result(plan, pointers)
        await self._store.write_result(plan.job_id, result)
        await self._announce(plan.job_id, result)

    async def _announce(self, job_id: str, result: Mapping[str, Any]) -> None:
        fields = {k: v for k, v in result.items() if k != "state"}
        await self._send_status(job_id, str(result["state"]), **fields)
        await self._store.clear_active(job_id)
        await self._pool.release(job_id)
        self._monitor.forget(job_id)
        self._outcomes.labels(str(result["state"])).inc()
        log.info(
            "job %s %s: %s",
            job_id,
            result["state"],
            result.get("metrics") or result.get("error") or result.get("reason", ""),
        )
