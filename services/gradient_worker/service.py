"""Kafka and S3 edges of a gradient worker.

How a worker learns of a job: it reads every partition of ``maas.params.v1`` from the moment it
starts. Parameters of a job it does not know make it read the job's plan from S3; if its id
(``MAAS_WORKER_ID``) is below the job's ``training.workers`` it joins: loads the starting weights
and its shard of the data, and trains. Shards republish their parameters while they wait for
gradients, so a worker that starts (or restarts) mid-job joins at the next version.

One job step at a time: compute (forward/backward + encoding) runs on a worker thread while the
event loop keeps receiving parameters; the gradients are sent, every ack awaited, before the
next step starts (so a gradient's bytes are never reused while in flight).
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from safetensors.torch import load as load_safetensors

from maas import datasets, events, topics
from maas.bus import EventProducer
from maas.config import Settings
from maas.errors import InvalidArgument, MaasError, NotFound
from maas.store import AsyncObjectStore
from maas.training import protocol
from maas.training.prepare import load_dataset
from maas.training.storage import TrainingStore
from maas.training.transport import PartitionReader, RawRecord, dead_letter, decode, send_all
from services.gradient_worker.core import ShardParams, StepOutcome, WorkerJob

log = logging.getLogger(__name__)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.steps = Counter("maas_worker_steps", "gradient steps computed", registry=self.registry)
        self.bytes_sent = Counter(
            "maas_worker_gradient_bytes", "gradient payload bytes sent", registry=self.registry
        )
        self.step_seconds = Histogram(
            "maas_worker_compute_seconds",
            "forward+backward+encode per step",
            registry=self.registry,
        )


class WorkerService:
    def __init__(self, settings: Settings, worker_id: int) -> None:
        self.settings = settings
        self.worker_id = worker_id
        self.name = f"gradient-worker-{worker_id}"
        self.metrics = Metrics()
        self._producer = EventProducer(settings, client_id=self.name)
        self._objects = AsyncObjectStore(settings)
        self._store = TrainingStore(self._objects)
        self._params = PartitionReader(
            settings, topics.PARAMS, range(topics.PARAMS.partitions), client_id=self.name
        )
        self._assembler = protocol.PayloadAssembler()
        self._compute = ThreadPoolExecutor(1, thread_name_prefix="maas-grad")
        self.jobs: dict[str, WorkerJob] = {}
        self._not_mine: set[str] = set()
        self._wake = asyncio.Event()

    async def start(self) -> None:
        await self._producer.start()
        await self._objects.start()
        await self._params.start()
        await self._params.from_now()

    async def stop(self) -> None:
        await self._params.stop()
        await self._objects.stop()
        await self._producer.stop()
        self._compute.shutdown(wait=False, cancel_futures=True)

    async def run(self) -> None:
        await asyncio.gather(self._receive(), self._train())

    # --- parameters in ----------------------------------------------------------------------

    async def _receive(self) -> None:
        while True:
            for raw in await self._params.next_batch():
                await self._on_params(raw)

    async def _on_params(self, raw: RawRecord) -> None:
        if protocol.job_of_key(raw.key) in self._not_mine:
            return  # skipped before decoding: other jobs' parameters cost only the fetch
        try:
            event = decode(raw, events.PARAMS).event
        except MaasError as exc:
            await dead_letter(self._producer, raw, exc, self.name)
            return
        job_id = event["job_id"]
        if job_id in self._not_mine:
            return
        try:
            job = self.jobs.get(job_id) or await self._join(job_id)
        except MaasError as exc:
            log.warning(
                "cannot join job %s yet (%s); trying again on its next parameters",
                job_id,
                exc.message,
            )
            return
        if job is None:
            return
        shard, version = int(event["shard"]), int(event["version"])
        try:
            if shard >= job.plan.shards:
                raise InvalidArgument(f"shard {shard} is not one of the job's {job.plan.shards}")
            assembled = self._assembler.add((job_id, shard, version), event)
            if assembled is None:
                return
            size = job.plan.partitions[shard].size
            values = protocol.params_values(assembled.payload, size)
        except MaasError as exc:
            await dead_letter(self._producer, raw, exc, self.name)
            return
        if job.receive(shard, ShardParams(version, values, bool(event.get("final")))):
            self._wake.set()

    async def _join(self, job_id: str) -> WorkerJob | None:
        try:
            plan = await self._store.read_plan(job_id)
        except NotFound:
            log.warning("parameters for job %s, which has no plan in S3; ignoring it", job_id)
            self._not_mine.add(job_id)
            return None
        if self.worker_id >= plan.workers:
            self._not_mine.add(job_id)
            return None
        state = load_safetensors(await self._store.read_init(job_id))
        dataset = await asyncio.to_thread(
            load_dataset,
            plan.dataset,
            seed=plan.training.seed,
            fetch=datasets.fetcher(self._objects.sync, self.settings),
        )
        job = await asyncio.to_thread(WorkerJob, plan, self.worker_id, state, dataset)
        self.jobs[job_id] = job
        log.info(
            "joined job %s as worker %d of %d (%d steps, codec %s)",
            job_id,
            self.worker_id,
            plan.workers,
            plan.total_steps,
            plan.training.gradient_codec,
        )
        return job

    # --- gradients out ----------------------------------------------------------------------

    async def _train(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            for job_id, job in list(self.jobs.items()):
                if job.finished:
                    log.info("job %s finished after %d steps here", job_id, job.steps)
                    del self.jobs[job_id]
                    self._not_mine.add(job_id)
                elif job.ready():
                    view = job.take()
                    try:
                        with self.metrics.step_seconds.time():
                            outcome = await loop.run_in_executor(self._compute, job.compute, view)
                    except Exception:
                        # A step that cannot be computed will not compute next time either.
                        log.exception("job %s: step failed; leaving the job", job_id)
                        del self.jobs[job_id]
                        self._not_mine.add(job_id)
                        continue
                    await self._send(job, outcome)
                    self._wake.set()  # look again: parameters may have arrived meanwhile

    async def _send(self, job: WorkerJob, outcome: StepOutcome) -> None:
        items: list[tuple[str, int, dict[str, Any]]] = []
        for grad in outcome.gradients:
            for event in protocol.gradient_events(
                job_id=job.plan.job_id,
                shard=grad.shard,
                worker=self.worker_id,
                step=outcome.step,
                version=grad.version,
                codec=job.codec.name,
                samples=outcome.batch.samples,
                payload=grad.payload,
                chunk_bytes=self.settings.codec_chunk_bytes,
                loss=outcome.batch.loss,
                accuracy=outcome.batch.accuracy,
            ):
                key = protocol.record_key(job.plan.job_id, grad.shard)
                part = protocol.partition_for(grad.shard, topics.GRADIENTS.partitions)
                items.append((key, part, event))
        await send_all(self._producer, topics.GRADIENTS, items)
        self.metrics.steps.inc()
        sent = sum(protocol.payload_bytes(g.payload) for g in outcome.gradients)
        self.metrics.bytes_sent.inc(sent)
