"""An aggregator shard (``MAAS_AGGREGATOR_ROLE=shard``): a member of the training pool.

It has no fixed index. It serves the training data plane (``maas.training.v1``, gRPC), says
``up`` with that address on the control topic every heartbeat period, and owns whatever
partitions of whatever jobs the coordinator assigns it (``maas.assignment/1``), running the pure
``ShardCore`` for each: every worker of a job holds one stream to it per partition, pushes
gradient pieces in, and gets every version the shard closes back on the same stream.

Lifecycle of a (job, partition) here:

1. **Activation**: an assignment names this member for the partition. The shard loads the
   partition's newest checkpoint (version 0 at a job's start, a later one when the partition
   moved here from a shard that died); a worker that joins gets the current parameters at once.
2. **Steps**: each complete gradient is offered to the core (sync quorum or async staleness;
   duplicates and stale ones are dropped there). Each new version goes to every joined worker.
3. **Membership**: the assignment's ranks are the core's members: a rank the coordinator took
   away is removed, a rank it filled is added at the open step. A worker whose stream has been
   gone ``MAAS_WORKER_HEARTBEAT_TIMEOUT_MS`` is removed too (the status says so); one that
   (re)joins counts again from the open step.
4. **Checkpoints** every ``checkpoint_every`` versions, written off the event loop: data, then the
   ``LATEST.json`` pointer. Each version sent names the newest durable one; workers keep what they
   pushed since, so a restarted shard gets those gradients again and replays exactly. A version
   more than two intervals past the newest durable one is held back until a checkpoint lands
   (``held_back``): that bounds what the workers keep while S3 is slow or away.
5. **Done**: the final version goes out with ``final`` and is checkpointed with ``final`` set in
   the pointer, which is what the coordinator waits for. A partition assigned elsewhere is dropped.

The owner of partition 0 reports progress for the whole job.

No torch in this process: its memory is the partitions, their optimizer state and gradient sums.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from prometheus_client import CollectorRegistry

from maas.config import Settings
from maas.errors import FailedPrecondition, InvalidArgument, Unavailable
from maas.events import now_ms, printable
from maas.liveness import Liveness
from maas.training import broadcast, protocol
from maas.training.control import RELEASED, PoolMember
from maas.training.pool import SHARD, Assignment
from maas.training.v1 import training_pb2 as pb
from services.aggregator.dataplane import advertised, serve_data_plane
from services.aggregator.shard_job import (
    CheckpointWriter,
    Key,
    Peer,
    ShardJob,
    ShardMetrics,
    StatusReporter,
    check_ahead,
    deferral,
    held_back,
    resume,
)

log = logging.getLogger(__name__)

TICK_S = 0.05
# A shard that resumed a partition mid-way waits this many heartbeat timeouts for a worker to
# come back before removing it. A worker that never joined is not removed here at all (loading
# torch and the data can take long on a busy host): the coordinator removes it if it goes silent.
RESUME_GRACE = 3
WRITE_RETRY_MS = 1_000  # a held job's checkpoint write is tried again this often


class ShardService:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._pool = PoolMember(settings, SHARD, "aggregator")
        self.member_id, self.name = self._pool.member_id, self._pool.name
        self.address = ""
        self.metrics = ShardMetrics()
        self.liveness = Liveness(self.metrics.registry)  # its loops' crash ends the process
        self.liveness.dependencies.add_kafka_and_s3(self._pool.producer, settings)
        self._reporter = StatusReporter(self._pool.producer, self.name)
        self._checkpoints = CheckpointWriter(
            self._pool.store,
            self._reporter,
            self.metrics.checkpoints,
            report_every_ms=settings.progress_interval_ms,
        )
        self._server: Any = None
        self.jobs: dict[Key, ShardJob] = {}
        # Finishing outlives the stream whose push closed the last step (its worker leaves).
        self._finishing: dict[Key, asyncio.Task[None]] = {}
        self._done: set[Key] = set()
        self._activating: set[Key] = set()  # assigned twice while the first load awaits S3

    # --- lifecycle --------------------------------------------------------------------------

    @property
    def metrics_registry(self) -> CollectorRegistry:
        return self.metrics.registry

    async def start(self) -> None:
        running = await self._pool.start()
        self._server, port = await serve_data_plane(self, self.settings)
        self.address = advertised(
            self.settings.aggregator_listen, port, self.settings.aggregator_advertise
        )
        self._pool.heartbeat.address = self.address
        for assignment in running:
            await self._assigned(assignment)
        log.info("%s serves the training data plane at %s", self.name, self.address)

    async def stop(self) -> None:
        await self._pool.heartbeat.leave()
        for job in self.jobs.values():
            job.close_peers()
        if self._server is not None:
            await self._server.stop(grace=1.0)
        for task in list(self._finishing.values()):
            task.cancel()  # whoever owns the partition next finishes it from the checkpoint
        await asyncio.gather(*self._finishing.values(), return_exceptions=True)
        for job in self.jobs.values():
            if job.writing is not None:
                await asyncio.gather(job.writing, return_exceptions=True)
        await self._reporter.drain()
        await self._pool.stop()

    async def run(self) -> None:
        await asyncio.gather(self._pool.heartbeat.run(), self._read_assignments(), self._tick())

    # --- assignments ------------------------------------------------------------------------

    async def _read_assignments(self) -> None:
        while True:
            for state, assignment in await self._pool.assignments.next_batch():
                try:
                    if state == RELEASED:
                        self._released(assignment.job_id)
                    else:
                        await self._assigned(assignment)
                except Exception:  # one job that cannot start must not stop the others
                    log.exception("%s: cannot apply the assignment of %s", self.name, assignment)

    async def _assigned(self, assignment: Assignment) -> None:
        mine = set(assignment.partitions_of(self.member_id))
        for key, job in list(self.jobs.items()):
            if key[0] != assignment.job_id or assignment.epoch < job.assignment.epoch:
                continue
            if key[1] in mine:
                await self._apply_ranks(job, assignment)
            else:
                self._drop(key, f"partition moved to {assignment.shards.get(key[1])}")
        for partition in sorted(mine):
            await self._activate((assignment.job_id, partition), assignment)

    def _released(self, job_id: str) -> None:
        for key in [k for k in self.jobs if k[0] == job_id and k not in self._finishing]:
            self._drop(key, "the job is over")

    def _drop(self, key: Key, why: str) -> None:
        job = self.jobs.pop(key)
        job.close_peers()
        log.info("%s: dropped partition %d of job %s (%s)", self.name, key[1], key[0], why)

    async def _apply_ranks(self, job: ShardJob, assignment: Assignment) -> None:
        job.assignment = assignment
        now, before = now_ms(), job.core.version
        for rank in sorted(job.core.members - set(assignment.workers)):
            job.core.remove(rank, now)
            job.gone_ms.pop(rank, None)
            change = f"worker {rank} removed: the coordinator took its rank away"
            await self._reporter.members(job, f"{change} (epoch {assignment.epoch})")
        for rank in sorted(set(assignment.workers) - job.core.members):
            job.core.add(rank)
        if job.core.version != before:
            await self._advanced(job)  # removing a rank closed the open step

    async def _activate(self, key: Key, assignment: Assignment) -> None:
        """Load the partition's checkpoint (once, however often it is assigned)."""
        if key in self.jobs or key in self._done or key in self._activating:
            return
        self._activating.add(key)
        try:
            await self._load(key, assignment)
        finally:
            self._activating.discard(key)

    async def _load(self, key: Key, assignment: Assignment) -> None:
        grace_ms = (RESUME_GRACE - 1) * self.settings.worker_heartbeat_timeout_ms
        resumed = await resume(self._pool.store, key, assignment, grace_ms)
        if resumed is None:
            return
        job, already_final = resumed
        core = job.core
        self.jobs[key] = job
        log.info(
            "%s: partition %d of job %s at version %d of %d (%d parameters)",
            self.name,
            key[1],
            key[0],
            core.version,
            job.plan.target_version,
            core.partition.size,
        )
        if core.done:
            await self._finish(key, job, already_final=already_final)
        else:
            self._publish(job)

    # --- the data plane (called by the servicer) ----------------------------------------------

    async def attach(self, join: pb.Join) -> Peer:
        """A worker's stream joined: it gets the current parameters at once."""
        key, job_id = (join.job_id, join.shard), printable(join.job_id, 100)  # the client's
        if key in self._done:
            raise FailedPrecondition(f"job {job_id} is over on {self.name}")
        job = self.jobs.get(key)
        if job is None:
            raise Unavailable(
                f"{self.name} does not serve partition {join.shard} of job {job_id} (yet); "
                "read the job's assignment again"
            )
        worker = join.worker
        if not 0 <= worker < job.plan.workers:
            raise InvalidArgument(
                f"worker {worker} is not one of job {job_id}'s ranks 0..{job.plan.workers - 1}"
            )
        if not join.member:
            raise InvalidArgument("join.member is empty: a worker names its pool member id")
        holder = job.assignment.workers.get(worker)
        if holder != join.member:  # a stream for a rank takes over that rank's current one
            raise Unavailable(
                f"rank {worker} of job {job_id} is assigned to {holder or 'nobody'}, "
                f"not {printable(join.member, 100)}, as far as {self.name} knows"
            )
        previous = job.peers.pop(worker, None)
        if previous is not None:
            previous.close()  # a reconnect: the old stream is dead to the worker already
        peer = Peer(join.job_id, join.shard, worker)
        job.peers[worker] = peer
        job.gone_ms.pop(worker, None)
        job.core.undefer(worker)  # said on the old stream: the new one says it again if need be
        if job.core.add(worker):
            log.info("%s: worker %d rejoined job %s", self.name, worker, join.job_id)
            await self._reporter.members(job, f"worker {worker} joined")
        if job.joined_by(worker, join.member):
            self._checkpoints.start(job, final=False)
        peer.send(job.current)
        return peer

    def detach(self, peer: Peer) -> None:
        job = self.jobs.get((peer.job_id, peer.partition))
        if job is not None and job.peers.get(peer.worker) is peer:
            del job.peers[peer.worker]
            job.gone_ms[peer.worker] = now_ms()

    async def on_push(self, peer: Peer, push: protocol.PushFrame) -> None:
        job = self.jobs.get((peer.job_id, peer.partition))
        if job is None:
            return  # the job finished (or moved) while this piece was on its way
        check_ahead(push.push.version, job)
        contribution = job.assembler.add(peer.worker, push)  # InvalidArgument ends the stream
        if contribution is None:
            return
        core = job.core
        before = core.version
        if not job.started_ms:  # training time starts here, not while workers were loading
            job.started_ms = now_ms()
        verdict = core.offer(contribution, now_ms())
        self.metrics.gradients.labels(verdict.value).inc()
        if core.version != before:
            await self._advanced(job)

    async def on_pushes_from(self, peer: Peer, version: int) -> None:
        """The worker can push from ``version`` on only: not waited for before it."""
        job = self.jobs.get((peer.job_id, peer.partition))
        if job is None or job.peers.get(peer.worker) is not peer:
            return  # the job is over here, or a newer stream took the rank over
        if peer.worker not in job.assignment.workers:
            return  # the coordinator took the rank away meanwhile: nothing to wait for
        check_ahead(version, job, "pushes_from.version")
        core, before = job.core, job.core.version
        if version < 0:
            raise InvalidArgument(f"pushes_from.version is {version}; it must be >= 0")
        if core.deferred(peer.worker) == version:
            return  # said before: a repeat changes nothing (and must not flood the statuses)
        if core.defer(peer.worker, version, now_ms()):
            change = deferral(job.partition, peer.worker, before, version)
            log.warning("%s: job %s: %s", self.name, job.job_id, change)
            await self._reporter.members(job, change)
        else:
            core.add(peer.worker)
        if core.version != before:
            await self._advanced(job)

    async def _advanced(self, job: ShardJob) -> None:
        key = job.key
        core, every = job.core, job.plan.training.checkpoint_every
        job.assembler.drop_below(core.version - job.plan.training.staleness)
        if core.done:  # the final version goes out once its checkpoint is durable (_finish)
            if key not in self._finishing:
                finishing = self._finish(key, job, already_final=False)
                self._finishing[key] = asyncio.create_task(finishing)
            return
        held = held_back(core.version, job.durable_version, every)
        if held and not job.held:
            self.metrics.holds.inc()
            job.hold_from(now_ms())
        job.held = held
        if not held:
            self._publish(job)
        if core.version - job.checkpointed_version >= every:
            self._checkpoints.start(job, final=False)

    async def _release(self, job: ShardJob, now: int) -> None:
        """A held version goes out once a checkpoint has landed; until then a write of the
        current version is tried every ``WRITE_RETRY_MS`` (the one that failed is not retried
        by itself), and a long hold is logged and reported once."""
        if not held_back(job.core.version, job.durable_version, job.plan.training.checkpoint_every):
            job.held = False
            if job.hold_told:
                log.info("%s: job %s partition %d goes on", self.name, job.job_id, job.partition)
            self._publish(job)
            return
        if job.hold_to_tell(now):
            log.warning(
                "%s: job %s partition %d has held version %d for %.1f s until a checkpoint "
                "lands (newest durable: %d); is S3 slow or unreachable?",
                self.name,
                job.job_id,
                job.partition,
                job.core.version,
                (now - job.held_since_ms) / 1000,
                job.durable_version,
            )
            await self._reporter.hold(job)
        if now - job.write_started_ms >= WRITE_RETRY_MS:
            self._checkpoints.start(job, final=False)

    def _publish(self, job: ShardJob) -> None:
        core = job.core
        job.current = broadcast.params_pieces(
            core.theta,
            version=core.version,
            final=core.done,
            durable_version=job.durable_version,
            dtype=job.plan.broadcast_dtype,
            chunk_bytes=self.settings.codec_chunk_bytes,
        )
        for peer in job.peers.values():
            peer.send(job.current)
        self.metrics.versions.inc()

    # --- checkpoints ------------------------------------------------------------------------

    async def _finish(self, key: Key, job: ShardJob, *, already_final: bool) -> None:
        """Write the final checkpoint (what the coordinator waits for), then send the final
        version, and forget the job. Not before: workers leave a job once every partition is
        final, dropping the pushes they kept, so a shard that died between sending it and the
        checkpoint landing would resume from an older one with nobody left to replay it."""
        if not already_final:
            await self._checkpoints.land_final(job)
        self._publish(job)
        self.jobs.pop(key, None)
        self._done.add(key)
        self._finishing.pop(key, None)
        job.close_peers()
        log.info(
            "%s: job %s partition %d done at version %d",
            self.name,
            key[0],
            key[1],
            job.core.version,
        )

    # --- timers -----------------------------------------------------------------------------

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            now = now_ms()
            for job in list(self.jobs.values()):
                if job.core.done:
                    continue  # finishing
                if job.held:
                    await self._release(job, now)
                elif job.durable_version < job.checkpoint_due and (
                    now - job.write_started_ms >= WRITE_RETRY_MS
                ):
                    self._checkpoints.start(job, final=False)  # the one at a rank's handover
                before = job.core.version
                await self._expire(job, now)
                job.core.tick(now)
                if job.core.version != before:
                    await self._advanced(job)
                if job.progress_due(now, self.settings.progress_interval_ms):
                    await self._reporter.progress(job, now)

    async def _expire(self, job: ShardJob, now: int) -> None:
        """Remove members whose stream has been gone longer than the heartbeat timeout."""
        timeout = self.settings.worker_heartbeat_timeout_ms
        for worker, since in job.silent_members(now, timeout):
            job.core.remove(worker, now)
            log.warning(
                "%s: worker %d of job %s removed: no stream for %d ms",
                self.name,
                worker,
                job.job_id,
                now - since,
            )
            await self._reporter.members(
                job, f"worker {worker} removed: no data-plane stream for {timeout} ms"
            )
