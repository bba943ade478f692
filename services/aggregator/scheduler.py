"""The coordinator's training pool: the control topic in, assignments and job statuses out.

``maas.training.pool.Pool`` decides; this adapter feeds it the members' heartbeats (the control
topic's one consumer group, so malformed records are dead-lettered there, once), runs its
``schedule`` every ``TICK_S``, and makes each decision durable and known, in this order: the
assignment to S3 (members that start later read it there), then to the control topic (running
members act on it), then the job's status (``queued`` with the reason, or ``running`` with the
assignment and what changed).

It also listens for what only it may write: an assignment or release of one of its jobs that it
did not publish ends that job (``foreign_assignment``), and workers' reports of a shard they
cannot reach (``worker_report``) let the pool move that shard's partitions.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Gauge

from maas import events, topics
from maas.bus import EventProducer, Record
from maas.bus_consumer import EventConsumer
from maas.config import Settings
from maas.errors import MaasError
from maas.jobs import status_event
from maas.training.control import (
    ASSIGNED,
    RELEASED,
    Heartbeat,
    Identity,
    assignment_event,
    member_name,
)
from maas.training.plan import JobPlan
from maas.training.pool import KINDS, Assignment, Change, Pool, Want
from maas.training.storage import TrainingStore

log = logging.getLogger(__name__)

GROUP_ID = "maas-training-pool"
TICK_S = 0.25
SERVICE = "training-coordinator"
COORDINATOR = "coordinator"  # the member kind of the coordinator's own heartbeat


def want_of(plan: JobPlan) -> Want:
    t = plan.training
    return Want(plan.job_id, t.workers, t.shards, t.min_workers or t.workers)


def foreign_assignment(state: str, heard: Assignment) -> str:
    """Why a job ends when a record of it on the control topic was not this coordinator's."""
    workers = ", ".join(m for _, m in sorted(heard.workers.items())) or "none"
    shards = ", ".join(
        f"{m} at {heard.addresses.get(p, '')}" for p, m in sorted(heard.shards.items())
    )
    what = "a release" if state == RELEASED else "an assignment"
    return (
        f"{what} this coordinator did not write (epoch {heard.epoch}; workers {workers}; shards "
        f"{shards or 'none'}) took the job's members; is another process writing "
        f"{topics.TRAINING_CONTROL.name}? Only the training coordinator may write assignments "
        "there (Kafka ACLs: docs/OPERATIONS.md, 'Who may write the control topic')"
    )


class PoolGauges:
    """What the pool holds, for Prometheus: set on the event loop after each ``schedule`` (a
    scrape runs on another thread and must not walk the pool's dicts while they change)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.jobs = Gauge(
            "maas_training_pool_jobs", "training jobs by state", ["state"], registry=registry
        )
        self.members = Gauge(
            "maas_training_pool_members",
            "live pool members by kind (worker, shard)",
            ["kind"],
            registry=registry,
        )
        self.free_workers = Gauge(
            "maas_training_pool_free_workers",
            "live gradient workers serving no job",
            registry=registry,
        )

    def observe(self, pool: Pool) -> None:
        self.jobs.labels("running").set(len(pool.running))
        self.jobs.labels("queued").set(len(pool.queue))
        for kind in KINDS:
            self.members.labels(kind).set(len(pool.alive(kind)))
        self.free_workers.set(len(pool.free_workers()))


class PoolScheduler:
    def __init__(
        self,
        settings: Settings,
        producer: EventProducer,
        store: TrainingStore,
        on_started: Callable[[str], None],
        on_member_failed: Callable[[str, str], None],
        metrics: CollectorRegistry | None = None,
    ) -> None:
        self.pool = Pool(settings.worker_heartbeat_timeout_ms)
        self._gauges = PoolGauges(metrics or CollectorRegistry())
        self._heartbeat = Heartbeat(
            producer, settings, Identity(member_name(settings), COORDINATOR)
        )
        self._producer = producer
        self._store = store
        self._on_started = on_started
        self._on_member_failed = on_member_failed  # (job_id, why): the job ends failed
        self._foreign: dict[str, Assignment] = {}  # queued jobs' assignments we did not write
        self._control = EventConsumer(
            settings,
            topics=[topics.TRAINING_CONTROL],
            group_id=GROUP_ID,
            handler=self._heard,
            producer=producer,
            expected_schemas=[events.MEMBER, events.ASSIGNMENT],
            auto_offset_reset="latest",
        )

    async def start(self) -> None:
        await self._control.start()

    async def stop(self) -> None:
        await self._control.stop()

    async def run(self) -> None:
        await asyncio.gather(self._control.run(), self._heartbeat.run(), self._tick())

    # --- jobs ---------------------------------------------------------------------------------

    async def submit(self, plan: JobPlan) -> None:
        """A job to place, or (after a restart) one placed already: its assignment is in S3."""
        assignment = await self._store.read_assignment(plan.job_id)
        if assignment is None:
            self.pool.submit(want_of(plan))
            return
        self.pool.resume(assignment, want_of(plan))
        self._on_started(plan.job_id)

    async def release(self, job_id: str) -> None:
        # A queued job has no assignment of ours; one a foreign record gave it is released, so
        # members that obeyed that record drop the job instead of training it for nobody.
        assignment = self.pool.release(job_id) or self._foreign.pop(job_id, None)
        if assignment is None:
            return
        try:
            await self._producer.send(
                topics.TRAINING_CONTROL, assignment_event(assignment, RELEASED), key=job_id
            )
        except MaasError as exc:  # members leave on the job's final parameters anyway
            log.warning("job %s: release not published (%s)", job_id, exc.message)

    # --- the control topic ----------------------------------------------------------------------

    def worker_report(self, event: Mapping[str, Any]) -> None:
        """A job status from a gradient worker: one with ``unreachable`` says it has had nothing
        from a partition's shard for a heartbeat timeout (the pool moves the partition once
        every rank says so). A report that is not well formed is ignored: it is advice."""
        report = event.get("unreachable")
        if not isinstance(report, Mapping):
            return
        try:
            self.pool.unreached(
                str(event["job_id"]),
                int(report["partition"]),
                str(report["member"]),
                str(report["address"]),
                int(report["rank"]),
                events.now_ms(),
            )
        except (KeyError, TypeError, ValueError):
            return

    async def _heard(self, record: Record) -> None:
        event = record.event
        self.pool.control_record(events.now_ms())
        if event["schema"] == events.ASSIGNMENT:
            self._assignment_heard(event)
            return
        if event["kind"] == COORDINATOR:
            return  # our own heartbeats: they only say the topic flows
        member = event["member_id"]
        if event["state"] == "down":
            self.pool.left(member)
            log.info("pool: %s %s left", event["kind"], member)
            return
        # Our clock, not the member's: clocks of other machines may be off by more than a timeout.
        if self.pool.heard(member, event["kind"], event.get("address", ""), events.now_ms()):
            log.info("pool: %s %s joined %s", event["kind"], member, event.get("address", ""))
        if "failed_job" in event:
            self._member_failed(member, event["failed_job"])

    def _assignment_heard(self, event: Mapping[str, Any]) -> None:
        """This coordinator is the only writer of assignments, and members obey the newest epoch
        they see: one of our jobs' records that is not ours took (or ended) the job on its
        members. Ours read back are the job's current assignment or an older epoch of it (one
        published before a later change, or before a restart); a release of a job still
        running, or anything for a queued job, is never ours.

        The job then fails, naming the record, and its members are released. Re-publishing our
        assignment above the foreign epoch would win one forged record back, but with a second
        coordinator (the likely writer) the two would outbid each other for ever, the members
        would keep dropping and reloading the job meanwhile, and a forged epoch near the top
        of the range cannot be outbid at all. Failing is bounded and says what happened."""
        job_id = str(event["job_id"])
        ours = self.pool.running.get(job_id)
        if ours is None and job_id not in self.pool.queue:
            return  # a job that is not (or no longer) ours to run: our own late records
        heard = Assignment.from_json(event)
        read_back = (
            ours is not None
            and event["state"] == ASSIGNED
            and (heard.epoch < ours.epoch or heard.to_json() == ours.to_json())
        )
        if read_back:
            return
        if ours is None and event["state"] == ASSIGNED:
            self._foreign[job_id] = heard  # released when the job ends (it has none of ours)
        self._on_member_failed(job_id, foreign_assignment(str(event["state"]), heard))

    def _member_failed(self, member: str, failed: dict[str, str]) -> None:
        job_id = failed["job_id"]
        assignment = self.pool.running.get(job_id)
        rank = None if assignment is None else assignment.rank_of(member)
        if rank is None:
            return  # a job already over, or one this member no longer works on
        self._on_member_failed(
            job_id,
            f"gradient worker {member} (rank {rank}) could not compute a step: {failed['message']}",
        )

    async def _tick(self) -> None:
        # A (re)started coordinator first learns the pool: until every live member had a full
        # timeout to say up, the members of resumed assignments are not gone, only unheard.
        await asyncio.sleep(self.pool.timeout_ms / 1000)
        while True:
            await asyncio.sleep(TICK_S)
            for member in self.pool.expire(events.now_ms()):
                log.warning("pool: %s %s is gone (no heartbeat)", member.kind, member.member_id)
            for change in self.pool.schedule():
                await self._apply(change)
            self._gauges.observe(self.pool)

    async def _apply(self, change: Change) -> None:
        job_id = change.job_id
        fields: dict[str, Any] = {"reason": change.reason}
        if change.assignment is not None:
            # Retried until it lands: a member must never act on an assignment S3 lacks.
            while True:
                try:
                    await self._store.write_assignment(change.assignment)
                    await self._producer.send(
                        topics.TRAINING_CONTROL,
                        assignment_event(change.assignment, ASSIGNED),
                        key=job_id,
                    )
                    break
                except MaasError as exc:
                    log.warning("job %s: assignment not published (%s); retrying", job_id, exc)
                    await asyncio.sleep(1.0)
            fields["assignment"] = change.assignment.to_json()
        state = "queued" if change.kind == "queued" else "running"
        log.info("job %s %s: %s", job_id, change.kind, change.reason)
        try:
            await self._producer.send(
                topics.JOB_STATUS,
                status_event(job_id, state, service=SERVICE, **fields),
                key=job_id,
            )
        except MaasError as exc:
            log.warning("job %s: status not sent (%s)", job_id, exc.message)
        if change.kind == "started":
            self._on_started(job_id)
