"""The edges of a gradient worker: Kafka is its control plane (heartbeats out, assignments in),
S3 holds the jobs' plans, data and starting weights, and the training data plane (gRPC) carries
gradients and parameters.

The worker is a member of the training pool with no fixed id: it says ``up`` on the control topic
every heartbeat period. When the coordinator's assignment (``maas.assignment/1``; at start, the
ones S3 holds for active jobs) gives it a rank in a job, it joins: loads the starting weights and
the rank's shard of the data, and opens one stream per partition to the shard the assignment
names (``ShardLink``); each shard answers with its current parameters, so a worker that joins
mid-job computes from the job's current version. An assignment that no longer names it, or the
job's release, makes it leave. A shard it gets nothing from for a heartbeat timeout is reported
in the job's status (``unreachable``: the reason for people, the partition, shard and address
for the coordinator, which moves the partition once every rank of the job reported it).

A worker whose token the shards refuse fails the job it was given (saying which token it
needs) and leaves the pool for a while (MAAS_WORKER_REJOIN_AFTER_MS, doubling up to
``MAX_REJOIN_AFTER_S`` while refusals go on), its ``/healthz`` saying why: one misconfigured
worker must not fail every job the coordinator would give it. Before it offers itself again it
asks the shard that refused it whether it takes the token now (``token_accepted``, which joins
no job), and stays out, the wait doubled, while the answer is no: a token table that was fixed
brings it back, one that was not costs no further job.

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

from maas import datasets, topics
from maas.config import Settings
from maas.errors import InvalidArgument, MaasError, NotFound, Unavailable
from maas.jobs import status_event
from maas.liveness import Liveness
from maas.training.broadcast import ShardParams
from maas.training.control import RELEASED, PoolMember
from maas.training.dataplane import token_accepted
from maas.training.pool import WORKER, Assignment
from maas.training.prepare import load_dataset
from maas.training.protocol import OutgoingPush
from maas.training.worker import WorkerJob
from services.gradient_worker.link import ShardLink, Unreachable

log = logging.getLogger(__name__)

MAX_REJOIN_AFTER_S = 1800.0
OUT_OF_POOL = "training pool"  # the health condition while out of it


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.steps = Counter("maas_worker_steps", "gradient steps computed", registry=self.registry)
        self.bytes_sent = Counter(
            "maas_worker_gradient_bytes", "gradient frame bytes sent", registry=self.registry
        )
        self.step_seconds = Histogram(
            "maas_worker_compute_seconds",
            "forward+backward+encode per step",
            registry=self.registry,
        )


@dataclass
class Running:
    job: WorkerJob
    assignment: Assignment
    links: list[ShardLink]
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    on_link_end: Callable[[asyncio.Task[None]], None] = lambda _: None  # wakes the worker

    @property
    def rank(self) -> int:
        return self.job.worker

    @property
    def over(self) -> bool:
        return self.job.finished or all(link.over for link in self.links)

    @property
    def refusal(self) -> tuple[str, str] | None:
        """Why a shard refused this worker's token, and that shard's address, if one did."""
        return next(((link.refused, link.refused_at) for link in self.links if link.refused), None)

    def restart_dead_links(self) -> None:
        """Start again a link whose task ended while its job goes on. Links retry every fault
        themselves; one that ended anyway (a bug) must not leave its rank silent for good."""
        for index, (link, task) in enumerate(zip(self.links, self.tasks, strict=False)):
            if not task.done() or link.over or link.refused:
                continue
            error = None if task.cancelled() else task.exception()
            log.error(
                "job %s: the link to shard %d ended (%r); starting it again",
                self.assignment.job_id,
                link.shard,
                error or "cancelled",
                exc_info=error,
            )
            self.tasks[index] = asyncio.create_task(link.run())
            self.tasks[index].add_done_callback(self.on_link_end)

    def declare_pushes_from(self) -> None:
        """Tell each shard at a version this worker cannot push from which one it can. A
        worker cut off from a partition it never got (its shard said the job is over there:
        this process joined after that partition finished) can push nothing more at all."""
        cut_off = any(link.over and not self.job.has(link.shard) for link in self.links)
        for link in self.links:
            if link.shard_version < 0 or link.over:
                continue
            if cut_off:
                link.declare(self.job.nothing_to_push(link.shard_version))
            else:
                version = self.job.pushes_from(link.shard, link.shard_version, link.kept_versions())
                link.declare(version)

    def address(self, partition: int) -> str:
        """Where the newest assignment says the partition is served (read at every dial)."""
        address = self.assignment.addresses.get(partition, "")
        if not address:
            raise Unavailable(f"partition {partition} of {self.assignment.job_id} has no shard yet")
        return address


class WorkerService:
    def __init__(self, settings: Settings) -> None:
        if settings.worker_rejoin_after_ms <= 0:
            raise InvalidArgument(
                f"MAAS_WORKER_REJOIN_AFTER_MS={settings.worker_rejoin_after_ms}: give the "
                "milliseconds a refused worker waits before it asks the shard again, more than 0"
            )
        self.settings = settings
        self._pool = PoolMember(settings, WORKER, "gradient-worker")
        self.member_id, self.name = self._pool.member_id, self._pool.name
        self.metrics = Metrics()
        self.liveness = Liveness(self.metrics.registry)  # its loops' crash ends the process
        self.liveness.dependencies.add_kafka_and_s3(self._pool.producer, settings)
        self._compute = ThreadPoolExecutor(1, thread_name_prefix="maas-grad")
        self.jobs: dict[str, Running] = {}
        self._joining: dict[str, Assignment] = {}  # the newest assignment seen while loading
        self._wake = asyncio.Event()
        self._refusals = 0  # in a row: each doubles the time out of the pool
        self._out_of_pool: asyncio.Task[None] | None = None

    @property
    def metrics_registry(self) -> CollectorRegistry:
        return self.metrics.registry

    async def start(self) -> None:
        for assignment in await self._pool.start():
            await self._assigned(assignment)

    async def stop(self) -> None:
        if self._out_of_pool is not None:
            self._out_of_pool.cancel()
        await self._pool.heartbeat.leave()
        for job_id in list(self.jobs):
            await self._leave(job_id, "stopping")
        await self._pool.stop()
        self._compute.shutdown(wait=False, cancel_futures=True)

    async def run(self) -> None:
        await asyncio.gather(self._pool.heartbeat.run(), self._read_assignments(), self._train())

    # --- joining and leaving ------------------------------------------------------------------

    async def _read_assignments(self) -> None:
        while True:
            for state, assignment in await self._pool.assignments.next_batch():
                if state == RELEASED:
                    if assignment.job_id in self.jobs:
                        await self._leave(assignment.job_id, "the job is over")
                else:
                    await self._assigned(assignment)

    async def _assigned(self, assignment: Assignment) -> None:
        job_id = assignment.job_id
        if job_id in self._joining:
            if assignment.epoch >= self._joining[job_id].epoch:
                self._joining[job_id] = assignment  # applied once the load is done
            return
        running = self.jobs.get(job_id)
        if running is not None and assignment.epoch < running.assignment.epoch:
            return
        rank = assignment.rank_of(self.member_id)
        if running is not None:
            if rank == running.rank:
                running.assignment = assignment  # shards may have moved: links dial anew
                for link in running.links:
                    link.follow()
                return
            await self._leave(job_id, "the coordinator gave this rank to another worker")
        if rank is not None and self.out_of_pool:
            # Given before the coordinator heard this worker leave: it takes the rank back.
            log.info("not joining job %s: this worker is out of the training pool", job_id)
        elif rank is not None:
            self._joining[job_id] = assignment
            try:
                await self._join(assignment, rank)
            except MaasError as exc:
                log.warning("cannot join job %s (%s); waiting for its next assignment", job_id, exc)
            finally:
                newest = self._joining.pop(job_id)
            if newest is not assignment:
                await self._assigned(newest)

    async def _join(self, assignment: Assignment, rank: int) -> None:
        job_id = assignment.job_id
        try:
            plan = await self._pool.store.read_plan(job_id)
        except NotFound:
            log.warning("job %s is assigned but has no plan in S3; ignoring it", job_id)
            return
        state = load_safetensors(await self._pool.store.read_init(job_id))
        dataset = await asyncio.to_thread(
            load_dataset,
            plan.dataset,
            seed=plan.training.seed,
            fetch=datasets.fetcher(self._pool.objects.sync, self.settings),
        )
        job = await asyncio.to_thread(
            WorkerJob,
            plan,
            rank,
            state,
            dataset,
            chunk_bytes=self.settings.codec_chunk_bytes,
            overlap_min_bytes=self.settings.training_overlap_min_bytes,
        )
        running = Running(job, assignment, [])
        running.links = [
            ShardLink(
                job_id=job_id,
                worker=rank,
                member=self.member_id,
                shard=part.shard,
                partition_size=part.size,
                settings=self.settings,
                address=running.address,
                on_params=self._receiver(running),
                on_unreachable=self._unreachable_reporter(job_id, rank),
            )
            for part in plan.partitions
        ]
        running.on_link_end = lambda _: self._wake.set()  # it may end the job here: look
        running.tasks = [asyncio.create_task(link.run()) for link in running.links]
        for task in running.tasks:
            task.add_done_callback(running.on_link_end)
        self.jobs[job_id] = running
        log.info(
            "joined job %s as rank %d of %d (%d steps, codec %s)",
            job_id,
            rank,
            plan.workers,
            plan.total_steps,
            plan.training.gradient_codec,
        )

    def _receiver(self, running: Running) -> Callable[[int, ShardParams], None]:
        def receive(shard: int, params: ShardParams) -> None:
            running.job.receive(shard, params)
            # Also when not kept (a restarted shard's older version): the loop looks whether
            # that shard needs a PushesFrom.
            self._wake.set()

        return receive

    def _unreachable_reporter(self, job_id: str, rank: int) -> Unreachable:
        async def report(partition: int, address: str, what: str) -> None:
            running = self.jobs.get(job_id)
            if running is None or running.rank != rank:
                return  # left the job (or the rank) meanwhile
            shard = running.assignment.shards.get(partition, "")
            reason = (
                f"gradient worker {self.member_id} (rank {rank}) cannot reach the shard of "
                f"partition {partition} ({shard or 'unassigned'}) at {address}: {what}"
            )
            unreachable = {"partition": partition, "member": shard, "address": address}
            event = status_event(
                job_id,
                "running",
                service=self.name,
                reason=reason,
                unreachable={**unreachable, "rank": rank},
            )
            try:
                await self._pool.producer.send(topics.JOB_STATUS, event, key=job_id)
            except MaasError as exc:  # the link reports again after another timeout
                log.warning("job %s: status not sent (%s)", job_id, exc.message)

        return report

    async def _leave(self, job_id: str, why: str) -> None:
        running = self.jobs.pop(job_id)
        for link in running.links:
            link.close()
        for task in running.tasks:
            task.cancel()
        await asyncio.gather(*running.tasks, return_exceptions=True)
        # The links (their tasks, their finished coroutines' frames) refer back to `running`:
        # cut that cycle so the job's memory is returned now, not at some later full collection.
        running.links.clear()
        running.tasks.clear()
        log.info("left job %s after %d steps here (%s)", job_id, running.job.steps, why)

    async def _give_up(self, job_id: str, why: str) -> None:
        """Leave a job this worker cannot go on with, saying why: the coordinator fails the job
        with the reason instead of waiting for it to stall."""
        await self._pool.heartbeat.report_failure(job_id, why)
        await self._leave(job_id, why)

    @property
    def out_of_pool(self) -> bool:
        return self._out_of_pool is not None and not self._out_of_pool.done()

    def _withdraw(self, why: str, shard: str = "") -> None:
        """Leave the pool for a while after the shard at ``shard`` refused this worker's token
        (see the module doc); once at a time."""
        if not self.out_of_pool:
            self._out_of_pool = asyncio.create_task(self._stay_out(self._next_wait(), why, shard))

    def _next_wait(self) -> float:
        """Seconds out of the pool: doubled by each refusal in a row."""
        base = self.settings.worker_rejoin_after_ms / 1000
        seconds = min(MAX_REJOIN_AFTER_S, base * 2**self._refusals)
        self._refusals += 1
        return seconds

    async def _stay_out(self, seconds: float, why: str, shard: str) -> None:
        await self._pool.heartbeat.withdraw()
        reason = why
        while True:
            note = f"out of the training pool for {seconds:.0f} s, then it offers itself again"
            if shard:
                note += f" if the shard at {shard} takes its token"
            log.error("%s: %s", note, reason)
            self.liveness.set_condition(OUT_OF_POOL, f"{note}: {reason}")
            await asyncio.sleep(seconds)
            if not await self._still_refused_by(shard):
                break
            reason = f"asked again, the shard still refuses this worker's token; at first: {why}"
            seconds = self._next_wait()
        self.liveness.set_condition(OUT_OF_POOL, None)
        await self._pool.heartbeat.rejoin()
        log.info("back in the training pool")

    async def _still_refused_by(self, shard: str) -> bool:
        """Whether the shard at ``shard`` refuses this worker's token when asked again. One
        that cannot say (gone, moved, no address) does not keep the worker out: the next job
        will tell."""
        if not shard:
            return False
        try:
            return await token_accepted(shard, self.settings) is False
        except Exception:  # a fault in asking must not leave the worker out for good
            log.warning("could not ask the shard at %s about this token", shard, exc_info=True)
            return False

    # --- computing --------------------------------------------------------------------------

    async def _train(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            for job_id, running in list(self.jobs.items()):
                running.restart_dead_links()
                running.declare_pushes_from()  # new parameters, or a link that ended
                if running.over:
                    await self._leave(job_id, "its training is over")
                elif (refusal := running.refusal) is not None:
                    why, shard = refusal  # taken now: leaving drops the links
                    if self.out_of_pool:
                        # Said `down` already: the coordinator takes this worker out of the
                        # job. A report now would ride on an `up` and put it back in the pool.
                        await self._leave(job_id, why)
                    else:
                        await self._give_up(job_id, why)
                        self._withdraw(why, shard)
                elif running.job.ready():
                    await self._step(loop, job_id, running)
                    self._wake.set()  # look again: parameters may have arrived meanwhile

    async def _step(self, loop: asyncio.AbstractEventLoop, job_id: str, running: Running) -> None:
        job, links = running.job, running.links

        def send(shard: int, push: OutgoingPush) -> None:
            if not links:  # the job was left while this step computed: nowhere to send it
                return
            links[shard].push(push)
            self.metrics.bytes_sent.inc(len(push.frame))

        def emit(shard: int, push: OutgoingPush) -> None:  # on the compute thread
            loop.call_soon_threadsafe(send, shard, push)

        view, before = job.take(), job.steps
        try:
            with self.metrics.step_seconds.time():
                await loop.run_in_executor(self._compute, job.compute, view, emit)
        except Exception as exc:
            # A step that cannot be computed will not compute next time either: say why, so the
            # coordinator fails the job with the reason instead of waiting for it to stall. One
            # the job itself caused (it diverged) needs no traceback; anything else does.
            if isinstance(exc, MaasError):
                log.warning("job %s: step failed (%s); leaving the job", job_id, exc.message)
            else:
                log.exception("job %s: step failed; leaving the job", job_id)
            await self._give_up(job_id, f"{type(exc).__name__}: {exc}")
            return
        self.metrics.steps.inc(job.steps - before)  # a local-SGD round is several steps
        self._refusals = 0
