"""What an aggregator shard holds for one (job, partition) it serves, and for each worker's stream
to it (plain state: ``ShardService`` in shard.py acts on it); the statuses it reports and the
checkpoints it writes."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter

from maas import topics
from maas.bus import KAFKA_STOP_S, EventProducer
from maas.errors import InvalidArgument, MaasError, NotFound
from maas.events import now_ms
from maas.jobs import status_event
from maas.training import checkpoint as ck
from maas.training import protocol
from maas.training.aggregate import ShardCore
from maas.training.plan import HOLD_INTERVALS, JobPlan, kept_steps
from maas.training.pool import Assignment
from maas.training.storage import TrainingStore

log = logging.getLogger(__name__)

Key = tuple[str, int]  # (job id, partition)
FINAL_RETRY_S = 1.0  # the final checkpoint is written again this often until S3 holds it


@dataclass(eq=False)
class Peer:
    """One worker's stream: what the shard sends it (serialized ``ShardMessage``s) waits in
    ``outbox`` (None ends it)."""

    job_id: str
    partition: int
    worker: int
    outbox: asyncio.Queue[bytes | None] = field(default_factory=asyncio.Queue)
    error: MaasError | None = None  # why the shard ended the stream, if it was the worker's fault

    def send(self, messages: list[bytes]) -> None:
        for message in messages:
            self.outbox.put_nowait(message)

    def close(self) -> None:
        self.outbox.put_nowait(None)


# A job reports its progress at least this many times, however short it is.
PROGRESS_POINTS = 20


def progress_due(
    *, now_ms: int, reported_ms: int, interval_ms: int, version: int, reported: int, total: int
) -> bool:
    """Whether a progress status is due: every ``interval_ms`` and every 1/PROGRESS_POINTS of
    the ``total`` steps since the last one (at step ``reported``), whichever comes first — a
    job of a few seconds reports a curve too (the demo's digits jobs run 300 steps in ~2 s)."""
    every = max(1, total // PROGRESS_POINTS)
    return now_ms - reported_ms >= interval_ms or version - reported >= every


# A hold this short is a job stepping faster than S3 writes (checkpointing every few steps),
# not a slow S3: only a longer one is logged as a warning and reported in the job's status.
SLOW_HOLD_MS = 2_000


def held_back(version: int, durable: int, checkpoint_every: int) -> bool:
    """Whether a shard keeps ``version`` from the workers for now: it is more than two
    checkpoint intervals past the newest durable checkpoint (one interval to the next
    checkpoint, one for its write to land). Workers keep every push since that checkpoint, to
    replay them to a restarted shard, so this bounds their memory at about
    ``2 * checkpoint_every + 1`` steps of gradients (plus ``staleness`` in async mode): a slow
    or absent S3 pauses the job instead of growing the workers without end."""
    return version - durable > HOLD_INTERVALS * checkpoint_every


def check_ahead(version: int, job: ShardJob, what: str = "push version") -> None:
    """A push for a version the shard has not reached is held until it does (a worker replays
    what it kept to a restarted shard), but a worker only ever computes on versions a shard
    sent, at most ``kept_steps`` past the newest durable one: one further ahead comes from a
    faulty or foreign client, and holding it would grow the shard without bound."""
    training = job.plan.training
    window = kept_steps(training.checkpoint_every, training.staleness)
    if version - job.core.version > window:
        raise InvalidArgument(
            f"{what} {version} is {version - job.core.version} past the shard's "
            f"{job.core.version}; a worker's may be at most {window} ahead (a replay)"
        )


def deferral(partition: int, worker: int, version: int, pushes_from: int) -> str:
    """Why a shard at ``version`` goes on without ``worker`` up to ``pushes_from``."""
    return (
        f"worker {worker} can push partition {partition} from version {pushes_from} on only "
        f"(the shard is at {version}: it resumed from a checkpoint older than the process now "
        f"holding the rank, whose predecessor's pushes died with it, or the worker's other "
        f"partitions are past it); versions {version}..{pushes_from - 1} go on without that "
        "rank (closed empty if no worker can push them)"
    )


@dataclass
class ShardJob:
    plan: JobPlan
    partition: int
    assignment: Assignment
    core: ShardCore
    assembler: protocol.GradientAssembler
    started_ms: int  # when the first gradient arrived (0: none yet)
    checkpointed_version: int
    durable_version: int
    current: list[bytes] = field(default_factory=list)  # the newest version's frames
    peers: dict[int, Peer] = field(default_factory=dict)
    gone_ms: dict[int, int] = field(default_factory=dict)  # member -> since when streamless
    reported_ms: int = 0
    reported_version: int = 0
    writing: asyncio.Task[None] | None = None
    write_started_ms: int = 0
    held: bool = False  # the newest version is not sent yet (``held_back``)
    held_since_ms: int = 0
    hold_told: bool = False  # the hold has lasted long enough to be logged and reported
    checkpoint_told_ms: int = 0  # when the last ``checkpointed`` status went out
    rank_members: dict[int, str] = field(default_factory=dict)  # rank -> member that attached
    checkpoint_due: int = 0  # a version a durable checkpoint must reach soon (``joined_by``)

    @property
    def key(self) -> Key:
        return self.plan.job_id, self.partition

    def hold_from(self, now: int) -> None:
        self.held_since_ms, self.hold_told = now, False

    def hold_to_tell(self, now: int) -> bool:
        """Whether the current hold has just lasted ``SLOW_HOLD_MS``: told once per hold."""
        if self.hold_told or now - self.held_since_ms < SLOW_HOLD_MS:
            return False
        self.hold_told = True
        return True

    @property
    def job_id(self) -> str:
        return self.plan.job_id

    def joined_by(self, rank: int, member: str) -> bool:
        """``member`` attached for ``rank``. True when it is a process new to the rank after
        the newest durable checkpoint: it keeps pushes from here on only (those since that
        checkpoint died with the process it replaced), so were this shard to restart from that
        checkpoint it would wait for them for good. A checkpoint at this version is then due."""
        fresh = self.rank_members.get(rank) != member
        self.rank_members[rank] = member
        if not fresh or self.core.version <= self.durable_version:
            return False
        self.checkpoint_due = max(self.checkpoint_due, self.core.version)
        return True

    def progress_due(self, now: int, interval_ms: int) -> bool:
        """Partition 0's shard reports for the job once training started (``progress_due``)."""
        return (
            self.partition == 0
            and bool(self.started_ms)
            and progress_due(
                now_ms=now,
                reported_ms=self.reported_ms,
                interval_ms=interval_ms,
                version=self.core.version,
                reported=self.reported_version,
                total=self.plan.target_version,
            )
        )

    def silent_members(self, now: int, timeout_ms: int) -> list[tuple[int, int]]:
        """(worker, streamless since) of members without a stream for ``timeout_ms``; they
        are forgotten here (the caller removes them)."""
        silent = [
            (worker, since)
            for worker, since in self.gone_ms.items()
            if now - since >= timeout_ms and worker in self.core.members
        ]
        for worker, _ in silent:
            del self.gone_ms[worker]
        return silent

    def close_peers(self) -> None:
        for peer in self.peers.values():
            peer.close()


async def resume(
    store: TrainingStore, key: Key, assignment: Assignment, grace_ms: int
) -> tuple[ShardJob, bool] | None:
    """The partition's job from its newest checkpoint, and whether that one is final (None: the
    job has no plan or no checkpoint, logged). When resumed mid-way, its members have
    ``grace_ms`` to come back before they count as gone."""
    job_id, partition = key
    try:
        plan = await store.read_plan(job_id)
    except NotFound:
        log.warning("job %s is assigned but has no plan; skipping it", job_id)
        return None
    pointer = await store.pointer(job_id, partition)
    if pointer is None:
        log.error("job %s has no checkpoint for partition %d; skipping it", job_id, partition)
        return None
    snap = await store.read_checkpoint(pointer)
    now = now_ms()
    core = ShardCore.restore(plan, partition, snap, now_ms=now)
    core.members.intersection_update(assignment.workers)
    job = ShardJob(
        plan,
        partition,
        assignment,
        core,
        protocol.GradientAssembler(plan.training.gradient_codec, core.partition.size),
        started_ms=pointer.started_ms,  # 0 until the first gradient arrives
        checkpointed_version=pointer.version,
        durable_version=pointer.version,
        gone_ms={w: now + grace_ms for w in core.members} if core.version > 0 else {},
    )
    return job, pointer.final


def waiting_reason(job: ShardJob) -> str:
    return (
        f"partition {job.partition} is waiting for a checkpoint to land in S3 (newest "
        f"durable: version {job.durable_version}) before sending version {job.core.version}"
    )


class StatusReporter:
    """A shard's job statuses: membership changes, progress (partition 0's shard), holds,
    checkpoints.

    Sent in the background: with the broker away a send can take its request timeout, and the
    shard's steps must not wait for it. One that cannot be sent is logged, never raised; past
    ``MAX_PENDING`` unsent ones, new ones are dropped (progress is periodic anyway).
    """

    MAX_PENDING = 64

    def __init__(self, producer: EventProducer, service: str) -> None:
        self._producer = producer
        self._service = service
        self._pending: set[asyncio.Task[None]] = set()

    async def drain(self) -> None:
        """Wait for the statuses still being sent, at most KAFKA_STOP_S (with the broker away
        each would wait its request timeout): the partition's next owner reports the job from
        its checkpoint."""
        if not self._pending:
            return
        _, unsent = await asyncio.wait(self._pending, timeout=KAFKA_STOP_S)
        if unsent:
            log.warning(
                "%s: %d job statuses not delivered before stopping", self._service, len(unsent)
            )
        for send in unsent:
            send.cancel()

    async def members(self, job: ShardJob, change: str) -> None:
        members = {"active": sorted(job.core.members), "change": change, "shard": job.partition}
        await self._running(job, workers=members)

    async def progress(self, job: ShardJob, now: int) -> None:
        window = job.core.stats.take_window()
        elapsed_s = max(1e-3, (now - (job.reported_ms or job.started_ms)) / 1000)
        job.reported_ms, job.reported_version = now, job.core.version
        metrics = {k: v for k, v in window.items() if k in ("loss", "accuracy")}
        metrics["samples_per_s"] = window["samples"] / elapsed_s
        if not job.held:
            await self._running(job, metrics=metrics)
            return
        await self._running(job, metrics=metrics, reason=waiting_reason(job))

    async def hold(self, job: ShardJob) -> None:
        """The job stands still until this partition's checkpoint lands: said by the shard that
        holds it, whichever partition it serves (only partition 0's reports progress, and the
        others' holds stop the job just the same)."""
        await self._running(job, reason=waiting_reason(job))

    async def _running(self, job: ShardJob, **fields: object) -> None:
        """A ``running`` status at the job's current step, with ``fields``."""
        await self.status(
            job.job_id,
            "running",
            step=job.core.version,
            total_steps=job.plan.target_version,
            **fields,
        )

    async def status(self, job_id: str, state: str, **fields: object) -> None:
        if len(self._pending) >= self.MAX_PENDING:
            log.warning("status for %s dropped: %d still unsent", job_id, len(self._pending))
            return
        task = asyncio.create_task(self._send(job_id, state, **fields))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _send(self, job_id: str, state: str, **fields: object) -> None:
        try:
            await self._producer.send(
                topics.JOB_STATUS,
                status_event(job_id, state, service=self._service, **fields),
                key=job_id,
            )
        except MaasError as exc:
            log.warning("status for %s not sent: %s", job_id, exc.message)


class CheckpointWriter:
    """A shard's checkpoints of its jobs in S3: one write per job at a time, the snapshot encoded
    when asked (its bytes are that version's while the core moves on). A failed write is logged;
    the next one retries. Partition 0's shard reports durable ones as ``checkpointed``, at most
    one every ``report_every_ms``: a small job checkpointing every few milliseconds would
    otherwise write hundreds of statuses a minute."""

    def __init__(
        self, store: TrainingStore, reporter: StatusReporter, written: Counter, report_every_ms: int
    ) -> None:
        self._store = store
        self._reporter = reporter
        self._written = written
        self._report_every_ms = report_every_ms

    def start(self, job: ShardJob, *, final: bool) -> asyncio.Task[None] | None:
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
            epoch=job.assignment.epoch,
        )
        job.checkpointed_version = core.version
        job.write_started_ms = now_ms()
        job.writing = asyncio.create_task(self._write(job, pointer, data))
        return job.writing

    async def land_final(self, job: ShardJob) -> None:
        """Write the final checkpoint (what the coordinator waits for) and return once S3 holds
        it, however long S3 is away."""
        if job.writing is not None:
            await asyncio.gather(job.writing, return_exceptions=True)
        while True:
            task = self.start(job, final=True)
            if task is not None:
                await task
            try:
                pointer = await self._store.pointer(job.job_id, job.partition)
            except MaasError as exc:
                log.warning("final checkpoint of %s/%d not confirmed (%s)", *job.key, exc.message)
                pointer = None
            if pointer is not None and pointer.final:
                return
            if pointer is not None and pointer.epoch > job.assignment.epoch:
                log.warning(
                    "final checkpoint of %s/%d left to the shard that holds it now (epoch %d)",
                    *job.key,
                    pointer.epoch,
                )
                return
            await asyncio.sleep(FINAL_RETRY_S)

    async def _write(self, job: ShardJob, pointer: ck.Pointer, data: bytes) -> None:
        try:
            await self._store.write_checkpoint(
                job.job_id, job.partition, pointer.version, data, pointer
            )
        except MaasError as exc:
            log.warning(
                "checkpoint of %s/%d at %d failed (%s); the next one will retry",
                job.job_id,
                job.partition,
                pointer.version,
                exc.message,
            )
            return
        job.durable_version = max(job.durable_version, pointer.version)
        self._written.inc()
        if job.partition == 0 and not pointer.final:
            now = now_ms()
            if now - job.checkpoint_told_ms >= self._report_every_ms:
                job.checkpoint_told_ms = now
                await self._reporter.status(job.job_id, "checkpointed", step=pointer.version)


class ShardMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.gradients = Counter(
            "maas_shard_gradients", "gradients by verdict", ["verdict"], registry=self.registry
        )
        self.versions = Counter("maas_shard_versions", "versions published", registry=self.registry)
        self.checkpoints = Counter(
            "maas_shard_checkpoints", "checkpoints written", registry=self.registry
        )
        self.holds = Counter(
            "maas_shard_holds",
            "times a job's newest version was held back until a checkpoint landed",
            registry=self.registry,
        )
