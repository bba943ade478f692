"""The edges of a gradient worker: Kafka tells it which jobs run, S3 holds their plans, data and
the shards' addresses, and the training data plane (gRPC) carries gradients and parameters.

How a worker learns of a job: the coordinator's ``running`` status on ``maas.job-status.v1``
(and, at start, the jobs S3 marks active). If its id (``MAAS_WORKER_ID``) is below the job's
``training.workers`` it joins: loads the starting weights and its shard of the data, and opens
one stream per shard (``ShardLink``); each shard answers with its current parameters, so a
worker that starts (or restarts) mid-job computes from the job's current version.

One job step at a time: forward/backward runs on a worker thread while the event loop keeps
streaming; every gradient piece is handed to the loop the moment backward produced it
(``call_soon_threadsafe``) and leaves while backward continues.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram
from safetensors.torch import load as load_safetensors

from maas import datasets, events, topics
from maas.config import Settings
from maas.errors import MaasError, NotFound
from maas.store import AsyncObjectStore
from maas.training.prepare import load_dataset
from maas.training.protocol import ShardParams
from maas.training.storage import TrainingStore
from maas.training.transport import PartitionReader, decode
from maas.training.v1 import training_pb2 as pb
from maas.training.worker import WorkerJob
from services.gradient_worker.link import ShardLink

log = logging.getLogger(__name__)

COORDINATOR_SERVICE = "training-coordinator"


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


@dataclass
class Running:
    job: WorkerJob
    links: list[ShardLink]
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def over(self) -> bool:
        return self.job.finished or all(link.over for link in self.links)


class WorkerService:
    def __init__(self, settings: Settings, worker_id: int) -> None:
        self.settings = settings
        self.worker_id = worker_id
        self.name = f"gradient-worker-{worker_id}"
        self.metrics = Metrics()
        self._objects = AsyncObjectStore(settings)
        self._store = TrainingStore(self._objects)
        self._statuses = PartitionReader(
            settings, topics.JOB_STATUS, range(topics.JOB_STATUS.partitions), client_id=self.name
        )
        self._compute = ThreadPoolExecutor(1, thread_name_prefix="maas-grad")
        self.jobs: dict[str, Running] = {}
        self._seen: set[str] = set()
        self._wake = asyncio.Event()

    async def start(self) -> None:
        await self._objects.start()
        await self._statuses.start()
        await self._statuses.from_now()
        for job_id in await self._store.active_jobs():
            await self._consider(job_id)

    async def stop(self) -> None:
        for job_id in list(self.jobs):
            await self._leave(job_id)
        await self._statuses.stop()
        await self._objects.stop()
        self._compute.shutdown(wait=False, cancel_futures=True)

    async def run(self) -> None:
        await asyncio.gather(self._read_statuses(), self._train())

    # --- joining ----------------------------------------------------------------------------

    async def _read_statuses(self) -> None:
        while True:
            for raw in await self._statuses.next_batch(timeout_ms=200):
                try:
                    event = decode(raw, events.JOB_STATUS).event
                except MaasError:
                    continue  # status readers skip what is malformed; its producer is told
                if event.get("service") == COORDINATOR_SERVICE and event["state"] == "running":
                    await self._consider(event["job_id"])

    async def _consider(self, job_id: str) -> None:
        if job_id in self._seen:
            return
        self._seen.add(job_id)
        try:
            await self._join(job_id)
        except MaasError as exc:
            log.warning("cannot join job %s (%s)", job_id, exc.message)
            self._seen.discard(job_id)  # the next announcement tries again

    async def _join(self, job_id: str) -> None:
        try:
            plan = await self._store.read_plan(job_id)
        except NotFound:
            log.warning("job %s is announced but has no plan in S3; ignoring it", job_id)
            return
        if self.worker_id >= plan.workers:
            return
        state = load_safetensors(await self._store.read_init(job_id))
        dataset = await asyncio.to_thread(
            load_dataset,
            plan.dataset,
            seed=plan.training.seed,
            fetch=datasets.fetcher(self._objects.sync, self.settings),
        )
        job = await asyncio.to_thread(
            WorkerJob,
            plan,
            self.worker_id,
            state,
            dataset,
            chunk_bytes=self.settings.codec_chunk_bytes,
        )
        links = [
            ShardLink(
                job_id=job_id,
                worker=self.worker_id,
                shard=part.shard,
                partition_size=part.size,
                settings=self.settings,
                store=self._store,
                on_params=self._receiver(job),
            )
            for part in plan.partitions
        ]
        running = Running(job, links)
        running.tasks = [asyncio.create_task(link.run()) for link in links]
        for task in running.tasks:  # a link that ends may end the job here: look
            task.add_done_callback(lambda _: self._wake.set())
        self.jobs[job_id] = running
        log.info(
            "joined job %s as worker %d of %d (%d steps, codec %s)",
            job_id,
            self.worker_id,
            plan.workers,
            plan.total_steps,
            plan.training.gradient_codec,
        )

    def _receiver(self, job: WorkerJob) -> Callable[[int, ShardParams], None]:
        def receive(shard: int, params: ShardParams) -> None:
            if job.receive(shard, params):
                self._wake.set()

        return receive

    async def _leave(self, job_id: str) -> None:
        running = self.jobs.pop(job_id)
        for task in running.tasks:
            task.cancel()
        await asyncio.gather(*running.tasks, return_exceptions=True)
        log.info("left job %s after %d steps here", job_id, running.job.steps)

    # --- computing --------------------------------------------------------------------------

    async def _train(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            for job_id, running in list(self.jobs.items()):
                if running.over:
                    await self._leave(job_id)
                elif running.job.ready():
                    await self._step(loop, job_id, running)
                    self._wake.set()  # look again: parameters may have arrived meanwhile

    async def _step(self, loop: asyncio.AbstractEventLoop, job_id: str, running: Running) -> None:
        job, links = running.job, running.links

        def send(shard: int, push: pb.Push) -> None:
            links[shard].push(push)
            self.metrics.bytes_sent.inc(len(push.values) + len(push.indices))

        def emit(shard: int, push: pb.Push) -> None:  # on the compute thread
            loop.call_soon_threadsafe(send, shard, push)

        view, before = job.take(), job.steps
        try:
            with self.metrics.step_seconds.time():
                await loop.run_in_executor(self._compute, job.compute, view, emit)
        except Exception:
            # A step that cannot be computed will not compute next time either.
            log.exception("job %s: step failed; leaving the job", job_id)
            await self._leave(job_id)
            return
        self.metrics.steps.inc(job.steps - before)  # a local-SGD round is several steps
