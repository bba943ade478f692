"""The training control plane on Kafka (``maas.training-control.v1``), members' side.

Gradient workers and aggregator shards have no fixed ids: each names itself (``member_name``),
says ``up`` every ``MAAS_MEMBER_HEARTBEAT_MS`` (``Heartbeat``) and ``down`` when it stops. The
coordinator (the topic's one consumer group, which dead-letters what is malformed) turns that
into assignments (``maas.training.pool``) and publishes each one here and in S3. Members read
the newest assignment per job with ``AssignmentReader``: from the topic while they run, from S3
for jobs that were running before they started.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from typing import Any

from maas import events, topics
from maas.bus import EventProducer
from maas.config import Settings
from maas.errors import MaasError
from maas.training.pool import Assignment
from maas.training.storage import TrainingStore
from maas.training.transport import PartitionReader, decode

log = logging.getLogger(__name__)

ASSIGNED = "assigned"
RELEASED = "released"


def member_name(settings: Settings) -> str:
    """``MAAS_MEMBER_ID``, else host-pid-random: a restarted process is a new member."""
    if settings.member_id:
        return settings.member_id
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"


def member_event(member_id: str, kind: str, state: str, address: str = "") -> dict[str, Any]:
    return events.new_event(
        events.MEMBER, member_id=member_id, kind=kind, state=state, address=address
    )


def assignment_event(assignment: Assignment, state: str) -> dict[str, Any]:
    return events.new_event(events.ASSIGNMENT, state=state, **assignment.to_json())


class Heartbeat:
    """Says ``up`` every period until cancelled; ``down`` once, on ``leave``.

    A send that fails (broker away) is logged and tried again next period: a member never stops
    for it, and the coordinator counts it gone only after the timeout.
    """

    def __init__(
        self, producer: EventProducer, settings: Settings, member_id: str, kind: str
    ) -> None:
        self._producer = producer
        self._period_s = settings.member_heartbeat_ms / 1000
        self.member_id = member_id
        self.kind = kind
        self.address = ""
        self._failing = False

    async def run(self) -> None:
        while True:
            await self._say("up")
            await asyncio.sleep(self._period_s)

    async def leave(self) -> None:
        await self._say("down")

    async def _say(self, state: str) -> None:
        event = member_event(self.member_id, self.kind, state, self.address)
        try:
            await self._producer.send(topics.TRAINING_CONTROL, event, key=self.member_id)
        except MaasError as exc:
            if not self._failing:
                log.warning("%s: heartbeat not sent (%s); retrying", self.member_id, exc.message)
            self._failing = True
            return
        if self._failing:
            log.info("%s: heartbeats reach the broker again", self.member_id)
        self._failing = False


class AssignmentReader:
    """The newest assignment of every job, as the coordinator publishes them."""

    def __init__(self, settings: Settings, store: TrainingStore, client_id: str) -> None:
        self._store = store
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
        (the coordinator's consumer dead-letters it)."""
        out = []
        for raw in await self._reader.next_batch(timeout_ms=timeout_ms):
            try:
                event = decode(raw, events.ASSIGNMENT).event
            except MaasError:
                continue  # heartbeats, and anything malformed
            try:
                out.append((str(event["state"]), Assignment.from_json(event)))
            except (KeyError, TypeError, ValueError):
                continue
        return out
