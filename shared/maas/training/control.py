"""The training control plane on Kafka (``maas.training-control.v1``), members' side.

Gradient workers and aggregator shards have no fixed ids: each names itself (``member_name``),
says ``up`` every ``MAAS_MEMBER_HEARTBEAT_MS`` (``Heartbeat``) and ``down`` when it stops. The
coordinator (the topic's one consumer group, which dead-letters what is malformed) turns that
into assignments (``maas.training.pool``) and publishes each one here and in S3. Members read
the newest assignment per job with ``AssignmentReader``: from the topic while they run, from S3
for jobs that were running before they started. ``PoolMember`` bundles what every member holds.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from maas import events, topics
from maas.bus import KAFKA_STOP_S, EventProducer
from maas.bus_reader import PartitionReader
from maas.config import Settings
from maas.errors import FailedPrecondition, MaasError
from maas.events import shown
from maas.store_async import AsyncObjectStore
from maas.training.pool import Assignment
from maas.training.storage import TrainingStore

log = logging.getLogger(__name__)

ASSIGNED = "assigned"
RELEASED = "released"


def member_name(settings: Settings) -> str:
    """``MAAS_MEMBER_ID``, else host-pid-random: a restarted process is a new member."""
    if settings.member_id:
        return settings.member_id
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"


class IdentityTaken(FailedPrecondition):
    """Another process holds this member id (it started earlier): this one must stop."""


@dataclass(frozen=True)
class Identity:
    """Who this process is in the pool: the name, and which start of a process under it.

    A member id set by hand (``MAAS_MEMBER_ID``) is leased by heartbeats: of two processes
    saying ``up`` under it, the one that started first keeps it and the other stops
    (``fenced_by``), naming the holder. A generated id (``chosen`` False) holds this process's
    pid and a random part, so no other process can hold it: a record claiming it is forged
    or a stray, and stops nothing.
    """

    member_id: str
    kind: str
    incarnation: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    since: int = field(default_factory=events.now_ms)
    chosen: bool = True

    def fenced_by(self, event: Mapping[str, Any]) -> str | None:
        """Why this process must stop, if ``event`` shows an older holder of its id."""
        if event.get("member_id") != self.member_id or event.get("state") != "up":
            return None
        if not self.chosen:
            if event.get("incarnation") != self.incarnation:
                log.warning(
                    "a control record claims this process's generated member id %r for another "
                    "incarnation (%s): ignored; is something forging maas.training-control.v1?",
                    self.member_id,
                    shown(event.get("incarnation"), 40),
                )
            return None
        theirs = str(event.get("incarnation", ""))
        if not theirs or theirs == self.incarnation:
            return None
        their_since = int(event.get("since", 0))
        if (their_since, theirs) < (self.since, self.incarnation):
            return (
                f"member id {self.member_id!r} is held by another process (started "
                f"{their_since}, incarnation {theirs}); this one (started {self.since}) stops. "
                "Give each process its own MAAS_MEMBER_ID, or leave it unset"
            )
        return None


FAILURE_MESSAGE_CHARS = 2000


def member_event(
    identity: Identity, state: str, address: str = "", failed_job: Mapping[str, str] | None = None
) -> dict[str, Any]:
    extra = {"failed_job": dict(failed_job)} if failed_job else {}
    return events.new_event(
        events.MEMBER,
        member_id=identity.member_id,
        kind=identity.kind,
        state=state,
        address=address,
        incarnation=identity.incarnation,
        since=identity.since,
        **extra,
    )


def assignment_event(assignment: Assignment, state: str) -> dict[str, Any]:
    return events.new_event(events.ASSIGNMENT, state=state, **assignment.to_json())


class Heartbeat:
    """Says ``up`` every period until cancelled; ``down`` once, on ``leave`` (for good) or on
    ``withdraw`` (until ``rejoin``: the coordinator takes the member out of its jobs and gives
    it none meanwhile).

    A send that fails (broker away) is logged and tried again next period: a member never stops
    for it, and the coordinator counts it gone only after the timeout. A failure report rides
    on the heartbeats until one of them reaches the broker.
    """

    def __init__(self, producer: EventProducer, settings: Settings, identity: Identity) -> None:
        self._producer = producer
        self._period_s = settings.member_heartbeat_ms / 1000
        self.identity = identity
        self.member_id = identity.member_id
        self.address = ""
        self._failing = False
        self._withdrawn = False
        self._reports: dict[str, dict[str, str]] = {}  # by job id: failures not yet delivered

    async def run(self) -> None:
        while True:
            if not self._withdrawn:
                await self._say("up")
            await asyncio.sleep(self._period_s)

    async def leave(self) -> None:
        """Say ``down`` for good, waiting at most KAFKA_STOP_S: a member stopping while the
        broker is away is counted gone after the coordinator's heartbeat timeout instead."""
        try:
            async with asyncio.timeout(KAFKA_STOP_S):
                await self._say("down")
        except TimeoutError:
            log.info(
                "%s: `down` not delivered within %g s; the coordinator counts this member gone "
                "after its heartbeat timeout",
                self.member_id,
                KAFKA_STOP_S,
            )

    async def withdraw(self) -> None:
        self._withdrawn = True
        await self._say("down")

    async def rejoin(self) -> None:
        self._withdrawn = False
        await self._say("up")

    async def report_failure(self, job_id: str, message: str) -> None:
        """Tell the coordinator this member cannot go on with the job, and why: now, and with
        each next heartbeat until one is delivered (the coordinator acts on the first)."""
        self._reports[job_id] = {"job_id": job_id, "message": message[:FAILURE_MESSAGE_CHARS]}
        await self._say("up")

    async def _say(self, state: str) -> None:
        report = next(iter(self._reports.values()), None)
        event = member_event(self.identity, state, self.address, report)
        try:
            await self._producer.send(topics.TRAINING_CONTROL, event, key=self.member_id)
        except MaasError as exc:
            if not self._failing:
                log.warning("%s: heartbeat not sent (%s); retrying", self.member_id, exc.message)
            self._failing = True
            return
        if report is not None:
            self._reports.pop(report["job_id"], None)
        if self._failing:
            log.info("%s: heartbeats reach the broker again", self.member_id)
        self._failing = False


class AssignmentReader:
    """The newest assignment of every job, as the coordinator publishes them."""

    def __init__(
        self, settings: Settings, store: TrainingStore, client_id: str, identity: Identity
    ) -> None:
        self._store = store
        self._identity = identity
        self._reader = PartitionReader(
            settings,
            topics.TRAINING_CONTROL,
            range(topics.TRAINING_CONTROL.partitions),
            client_id=client_id,
        )

    async def start(self) -> list[Assignment]:
        """Listen from now on, then return the assignments of the jobs S3 marks active (read
        after the listening starts, so none falls between the two)."""
        await self._reader.start()
        await self._reader.from_now()
        found = []
        for job_id in await self._store.active_jobs():
            try:
                assignment = await self._store.read_assignment(job_id)
            except (MaasError, ValueError, KeyError) as exc:
                log.warning("job %s: unreadable assignment (%s); waiting for the next", job_id, exc)
                continue
            if assignment is not None:
                found.append(assignment)
        return found

    async def stop(self) -> None:
        await self._reader.stop()

    async def next_batch(self, timeout_ms: int = 200) -> list[tuple[str, Assignment]]:
        """(state, assignment) pairs in the order published; what is malformed is skipped here
        (the coordinator's consumer dead-letters it). Raises IdentityTaken when another process
        holds this member's id."""
        out = []
        schemas = [events.ASSIGNMENT, events.MEMBER]
        for record in await self._reader.next_records(schemas, timeout_ms=timeout_ms):
            event = record.event
            if event["schema"] == events.MEMBER:
                if reason := self._identity.fenced_by(event):
                    log.error("%s", reason)
                    raise IdentityTaken(reason)
                continue
            try:
                out.append((str(event["state"]), Assignment.from_json(event)))
            except (KeyError, TypeError, ValueError):
                continue
        return out


class PoolMember:
    """What a gradient worker and an aggregator shard hold alike as members of the pool: their
    name, a producer, the training store, the assignment reader and the heartbeat."""

    def __init__(self, settings: Settings, kind: str, service: str) -> None:
        self.member_id = member_name(settings)
        self.name = f"{service}-{self.member_id}"
        self.producer = EventProducer(settings, client_id=self.name)
        self.objects = AsyncObjectStore(settings)
        self.store = TrainingStore(self.objects)
        identity = Identity(self.member_id, kind, chosen=bool(settings.member_id))
        self.assignments = AssignmentReader(settings, self.store, self.name, identity)
        self.heartbeat = Heartbeat(self.producer, settings, identity)

    async def start(self) -> list[Assignment]:
        """Connect, then the assignments of the jobs already running (see AssignmentReader)."""
        await self.producer.start()
        await self.objects.start()
        return await self.assignments.start()

    async def stop(self) -> None:
        await self.assignments.stop()
        await self.objects.stop()
        await self.producer.stop()
