"""An aggregator shard (``MAAS_AGGREGATOR_ROLE=shard``, index ``MAAS_AGGREGATOR_SHARD``).

It owns partition ``shard`` of every job that has that many shards and runs the pure
``ShardCore`` behind the training data plane (``maas.training.v1``, gRPC): each worker of a job
holds one stream to it, pushes gradient pieces in, and gets every version the shard closes back
on the same stream. Kafka is only the control plane here: job activation and status.

Lifecycle of a job here:

1. **Activation**: the coordinator announces a job with a ``running`` status once its plan and
   every shard's version-0 checkpoint are in S3. The shard loads its checkpoint; a worker that
   joins gets the current parameters at once and computes from there.
2. **Steps**: each complete gradient is offered to the core (sync quorum or async staleness;
   duplicates and stale ones are dropped there). Each new version goes to every joined worker.
3. **Membership**: a member whose stream has been gone ``MAAS_WORKER_HEARTBEAT_TIMEOUT_MS`` is
   removed from the job (the status says so); one that (re)joins counts again from the open step.
4. **Checkpoints** every ``checkpoint_every`` versions, written off the event loop: data, then the
   ``LATEST.json`` pointer. Each version sent names the newest durable one; workers keep what they
   pushed since, so a restarted shard gets those gradients again and replays exactly.
5. **Done**: the final version goes out with ``final`` and is checkpointed with ``final`` set in
   the pointer, which is what the coordinator waits for.

On start the shard serves the data plane, writes its address to S3 for workers to find, and
resumes every job marked active from its pointer. Shard 0 reports progress for the whole job.

No torch in this process: its memory is the partition, the optimizer state and one gradient sum.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from maas import events, topics
from maas.bus import EventProducer
from maas.config import Settings
from maas.errors import FailedPrecondition, InvalidArgument, MaasError, NotFound, Unavailable
from maas.store import AsyncObjectStore
from maas.training import checkpoint as ck
from maas.training import protocol
from maas.training.aggregate import ShardCore
from maas.training.plan import JobPlan
from maas.training.storage import TrainingStore
from maas.training.transport import PartitionReader, decode, status_event
from maas.training.v1 import training_pb2 as pb
from services.aggregator.dataplane import serve_data_plane

log = logging.getLogger(__name__)

COORDINATOR_SERVICE = "training-coordinator"
TICK_S = 0.05
# A shard that resumed a job mid-way waits this many heartbeat timeouts for a worker to come
# back before removing it. At a job's start nobody is removed for not having joined yet (loading
# torch and the data can take long on a busy host): the coordinator's stall timeout covers that.
RESUME_GRACE = 3


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def advertised(listen: str, port: int, advertise: str) -> str:
    """The address workers dial: as configured, else the listen host with the bound port."""
    if advertise:
        return advertise
    host = listen.rpartition(":")[0] or "127.0.0.1"
    if host in ("0.0.0.0", "[::]", "::"):
        host = socket.gethostname()
    return f"{host}:{port}"


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


@dataclass(eq=False)
class Peer:
    """One worker's stream: what the shard sends it waits in ``outbox`` (None ends it)."""

    job_id: str
    worker: int
    outbox: asyncio.Queue[pb.ShardMessage | None] = field(default_factory=asyncio.Queue)
    error: MaasError | None = None  # why the shard ended the stream, if it was the worker's fault

    def send(self, messages: list[pb.ShardMessage]) -> None:
        for message in messages:
            self.outbox.put_nowait(message)

    def close(self) -> None:
        self.outbox.put_nowait(None)


@dataclass
class ShardJob:
    plan: JobPlan
    core: ShardCore
    assembler: protocol.GradientAssembler
    started_ms: int
    checkpointed_version: int
    durable_version: int
    current: list[pb.ShardMessage] = field(default_factory=list)
    peers: dict[int, Peer] = field(default_factory=dict)
    gone_ms: dict[int, int] = field(default_factory=dict)  # member -> since when streamless
    reported_ms: int = 0
    writing: asyncio.Task[None] | None = None


class ShardService:
    def __init__(self, settings: Settings, shard: int) -> None:
        self.settings = settings
        self.shard = shard
        self.name = f"aggregator-{shard}"
        self.address = ""
        self.metrics = Metrics()
        self._producer = EventProducer(settings, client_id=self.name)
        self._objects = AsyncObjectStore(settings)
        self._store = TrainingStore(self._objects)
        self._statuses = PartitionReader(
            settings, topics.JOB_STATUS, range(topics.JOB_STATUS.partitions), client_id=self.name
        )
        self._server: Any = None
        self.jobs: dict[str, ShardJob] = {}
        # Finishing outlives the stream whose push closed the last step (its worker leaves).
        self._finishing: dict[str, asyncio.Task[None]] = {}
        self._done: set[str] = set()
        self._activating: set[str] = set()  # announced twice while the first load awaits S3

    # --- lifecycle --------------------------------------------------------------------------

    @property
    def metrics_registry(self) -> CollectorRegistry:
        return self.metrics.registry

    async def start(self) -> None:
        await self._producer.start()
        await self._objects.start()
        await self._statuses.start()
        # Listen for new jobs before listing the active ones: none falls between the two.
        await self._statuses.from_now()
        for job_id in await self._store.active_jobs():
            await self._activate(job_id)
        self._server, port = await serve_data_plane(self, self.settings)
        self.address = advertised(
            self.settings.aggregator_listen, port, self.settings.aggregator_advertise
        )
        await self._store.advertise_shard(self.shard, self.address)
        log.info("%s serves the training data plane at %s", self.name, self.address)

    async def stop(self) -> None:
        for job in self.jobs.values():
            for peer in job.peers.values():
                peer.close()
        if self._server is not None:
            await self._server.stop(grace=1.0)
        for task in list(self._finishing.values()):
            task.cancel()  # a restart finishes it from the checkpoint
        await asyncio.gather(*self._finishing.values(), return_exceptions=True)
        for job in self.jobs.values():
            if job.writing is not None:
                await asyncio.gather(job.writing, return_exceptions=True)
        await self._statuses.stop()
        await self._objects.stop()
        await self._producer.stop()

    async def run(self) -> None:
        await asyncio.gather(self._read_statuses(), self._tick())

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

    async def _activate(self, job_id: str) -> None:
        """Load the job's checkpoint for this shard (once, however often it is announced)."""
        if job_id in self.jobs or job_id in self._done or job_id in self._activating:
            return
        self._activating.add(job_id)
        try:
            await self._load(job_id)
        finally:
            self._activating.discard(job_id)

    async def _load(self, job_id: str) -> None:
        try:
            plan = await self._store.read_plan(job_id)
        except NotFound:
            log.warning("job %s is marked active but has no plan; skipping it", job_id)
            return
        if self.shard >= plan.shards:
            self._done.add(job_id)
            return
        pointer = await self._store.pointer(job_id, self.shard)
        if pointer is None:
            log.error("job %s has no checkpoint for shard %d; skipping it", job_id, self.shard)
            return
        snap = await self._store.read_checkpoint(pointer)
        now = now_ms()
        core = ShardCore.restore(plan, self.shard, snap, now_ms=now)
        grace = now + (RESUME_GRACE - 1) * self.settings.worker_heartbeat_timeout_ms
        job = ShardJob(
            plan,
            core,
            protocol.GradientAssembler(plan.training.gradient_codec, core.partition.size),
            started_ms=pointer.started_ms or now,
            checkpointed_version=pointer.version,
            durable_version=pointer.version,
            gone_ms={w: grace for w in core.members} if core.version > 0 else {},
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
        self._publish(job)
        if core.done:
            await self._finish(job_id, job, already_final=pointer.final)

    # --- the data plane (called by the servicer) ----------------------------------------------

    async def attach(self, job_id: str, worker: int) -> Peer:
        """A worker's stream joined: it gets the current parameters at once."""
        if job_id in self._done:
            raise FailedPrecondition(f"job {job_id} is over on {self.name}")
        job = self.jobs.get(job_id)
        if job is None:
            raise Unavailable(f"{self.name} has not loaded job {job_id} yet; join again shortly")
        if not 0 <= worker < job.plan.workers:
            raise InvalidArgument(
                f"worker {worker} is not one of job {job_id}'s 0..{job.plan.workers - 1}"
            )
        previous = job.peers.pop(worker, None)
        if previous is not None:
            previous.close()  # a reconnect: the old stream is dead to the worker already
        peer = Peer(job_id, worker)
        job.peers[worker] = peer
        job.gone_ms.pop(worker, None)
        if job.core.add(worker):
            log.info("%s: worker %d rejoined job %s", self.name, worker, job_id)
            await self._report_members(job_id, job, f"worker {worker} joined")
        peer.send(job.current)
        return peer

    def detach(self, peer: Peer) -> None:
        job = self.jobs.get(peer.job_id)
        if job is not None and job.peers.get(peer.worker) is peer:
            del job.peers[peer.worker]
            job.gone_ms[peer.worker] = now_ms()

    async def on_push(self, peer: Peer, push: pb.Push) -> None:
        job = self.jobs.get(peer.job_id)
        if job is None:
            return  # the job finished while this piece was on its way
        contribution = job.assembler.add(peer.worker, push)  # InvalidArgument ends the stream
        if contribution is None:
            return
        core = job.core
        before = core.version
        verdict = core.offer(contribution, now_ms())
        self.metrics.gradients.labels(verdict.value).inc()
        if core.version != before:
            await self._advanced(peer.job_id, job)

    async def _advanced(self, job_id: str, job: ShardJob) -> None:
        job.assembler.drop_below(job.core.version - job.plan.training.staleness)
        self._publish(job)
        if job.core.done:
            if job_id not in self._finishing:
                finishing = self._finish(job_id, job, already_final=False)
                self._finishing[job_id] = asyncio.create_task(finishing)
        elif job.core.version - job.checkpointed_version >= job.plan.training.checkpoint_every:
            self._checkpoint(job_id, job, final=False)

    def _publish(self, job: ShardJob) -> None:
        core = job.core
        job.current = protocol.params_pieces(
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
            samples=core.stats.samples,
            started_ms=job.started_ms,
            written_ms=now_ms(),
            final=final,
        )
        job.checkpointed_version = core.version
        job.writing = asyncio.create_task(self._write(job_id, job, pointer, data))
        return job.writing

    async def _write(self, job_id: str, job: ShardJob, pointer: ck.Pointer, data: bytes) -> None:
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
        job.durable_version = max(job.durable_version, pointer.version)
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
        self._finishing.pop(job_id, None)
        for peer in job.peers.values():
            peer.close()
        log.info("%s: job %s done at version %d", self.name, job_id, job.core.version)

    # --- timers -----------------------------------------------------------------------------

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            now = now_ms()
            for job_id, job in list(self.jobs.items()):
                if job.core.done:
                    continue  # finishing
                before = job.core.version
                await self._expire(job_id, job, now)
                job.core.tick(now)
                if job.core.version != before:
                    await self._advanced(job_id, job)
                if self.shard == 0 and now - job.reported_ms >= self.settings.progress_interval_ms:
                    await self._progress(job_id, job, now)

    async def _expire(self, job_id: str, job: ShardJob, now: int) -> None:
        """Remove members whose stream has been gone longer than the heartbeat timeout."""
        timeout = self.settings.worker_heartbeat_timeout_ms
        for worker, since in list(job.gone_ms.items()):
            if now - since < timeout or worker not in job.core.members:
                continue
            del job.gone_ms[worker]
            job.core.remove(worker, now)
            log.warning(
                "%s: worker %d of job %s removed: no stream for %d ms",
                self.name,
                worker,
                job_id,
                now - since,
            )
            await self._report_members(
                job_id, job, f"worker {worker} removed: no data-plane stream for {timeout} ms"
            )

    async def _report_members(self, job_id: str, job: ShardJob, change: str) -> None:
        members = {"active": sorted(job.core.members), "change": change, "shard": self.shard}
        await self._status(
            job_id,
            "running",
            step=job.core.version,
            total_steps=job.plan.target_version,
            workers=members,
        )

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
