"""A worker that cannot compute a step says why in a heartbeat; the coordinator's pool scheduler
hands the reason on for the job that worker has a rank in, and ignores it otherwise. The same
way it ends a job that a control-topic record it did not write took over, and hands workers'
reports of a shard they cannot reach to the pool."""

from __future__ import annotations

from typing import Any

from pool_kit import SentEvents

from maas import events, topics
from maas.bus import EventProducer, Record
from maas.config import Settings
from maas.errors import Unavailable
from maas.training.control import (
    ASSIGNED,
    FAILURE_MESSAGE_CHARS,
    RELEASED,
    Heartbeat,
    Identity,
    assignment_event,
    member_event,
)
from maas.training.pool import Assignment, Want
from services.aggregator.scheduler import PoolScheduler

WORKER = Identity("w-7", "worker")


def scheduler(failures: list[tuple[str, str]]) -> PoolScheduler:
    settings = Settings()
    pool = PoolScheduler(
        settings,
        EventProducer(settings),
        store=None,  # type: ignore[arg-type]  # not reached: no job is placed here
        on_started=lambda job_id: None,
        on_member_failed=lambda job_id, why: failures.append((job_id, why)),
    )
    pool.pool.running["job-1"] = Assignment("job-1", 1, {0: "w-3", 1: "w-7"}, {0: "s-1"}, {})
    return pool


def heard(event: dict[str, object]) -> Record:
    return Record(topics.TRAINING_CONTROL.name, 0, 0, "w-7", event)


async def test_a_reported_failure_is_one_valid_up_heartbeat_with_its_message_bounded() -> None:
    producer = SentEvents()
    heartbeat = Heartbeat(producer, Settings(), WORKER)  # type: ignore[arg-type]
    await heartbeat.report_failure("job-1", "MemoryError: " + "x" * 5000)
    (event,) = producer.sent
    events.validate(event, events.MEMBER)
    assert event["state"] == "up" and event["failed_job"]["job_id"] == "job-1"
    assert len(event["failed_job"]["message"]) == FAILURE_MESSAGE_CHARS


async def test_a_ranked_workers_failure_fails_its_job_naming_worker_rank_and_reason() -> None:
    failures: list[tuple[str, str]] = []
    failed = {"job_id": "job-1", "message": "MemoryError: Unable to allocate 7.28 TiB"}
    await scheduler(failures)._heard(heard(member_event(WORKER, "up", failed_job=failed)))
    ((job_id, why),) = failures
    assert job_id == "job-1"
    assert "gradient worker w-7 (rank 1)" in why and "MemoryError: Unable to allocate" in why


async def test_a_failure_for_a_job_the_worker_has_no_rank_in_is_ignored() -> None:
    failures: list[tuple[str, str]] = []
    pool = scheduler(failures)
    for job_id in ("job-1", "job-over"):
        failed = {"job_id": job_id, "message": "boom"}
        other = Identity("w-9", "worker") if job_id == "job-1" else WORKER
        await pool._heard(heard(member_event(other, "up", failed_job=failed)))
    assert failures == []


class BrokerAwayOnce(SentEvents):
    """The first send fails as a producer's does when the broker is away; the rest arrive."""

    def __init__(self) -> None:
        super().__init__()
        self.refused = 0

    async def send(self, topic: object, event: dict[str, Any], key: str) -> None:
        if not self.refused:
            self.refused += 1
            raise Unavailable("broker away")
        await super().send(topic, event, key)


async def test_a_failure_report_lost_to_a_broker_outage_rides_the_next_heartbeat_once() -> None:
    producer = BrokerAwayOnce()
    heartbeat = Heartbeat(producer, Settings(), WORKER)  # type: ignore[arg-type]
    await heartbeat.report_failure("job-1", "MemoryError")
    assert producer.refused == 1 and producer.sent == []
    await heartbeat._say("up")  # the next heartbeat
    await heartbeat._say("up")  # and the one after: the report was delivered, it stops
    first, second = producer.sent
    assert first["failed_job"] == {"job_id": "job-1", "message": "MemoryError"}
    assert "failed_job" not in second


def assignment_record(assignment: Assignment, state: str = ASSIGNED) -> Record:
    return Record(
        topics.TRAINING_CONTROL.name, 0, 0, assignment.job_id, assignment_event(assignment, state)
    )


async def test_an_assignment_the_coordinator_did_not_write_fails_the_job_naming_it() -> None:
    failures: list[tuple[str, str]] = []
    pool = scheduler(failures)
    forged = Assignment("job-1", 999, {0: "ghost-w"}, {0: "ghost-s"}, {0: "127.0.0.1:1"})
    await pool._heard(assignment_record(forged))
    ((job_id, why),) = failures
    assert job_id == "job-1"
    assert "an assignment this coordinator did not write (epoch 999; workers ghost-w" in why
    assert "ghost-s at 127.0.0.1:1" in why
    assert "is another process writing maas.training-control.v1?" in why


async def test_the_coordinators_own_assignments_read_back_are_not_foreign() -> None:
    failures: list[tuple[str, str]] = []
    pool = scheduler(failures)
    current = pool.pool.running["job-1"]
    older = Assignment("job-1", 0, {0: "w-1"}, {0: "s-0"}, {0: "h:1"})  # before a later change
    over = Assignment("job-over", 5, {}, {}, {})  # a job no longer running: a late record
    for record in (current, older, over):
        await pool._heard(assignment_record(record))
    await pool._heard(assignment_record(over, RELEASED))
    assert failures == []


async def test_a_foreign_release_same_epoch_twin_or_record_of_a_queued_job_ends_it() -> None:
    failures: list[tuple[str, str]] = []
    pool = scheduler(failures)
    current = pool.pool.running["job-1"]
    twin = Assignment("job-1", current.epoch, {0: "w-3"}, {0: "s-1"}, {0: "elsewhere:1"})
    await pool._heard(assignment_record(twin))
    await pool._heard(assignment_record(current, RELEASED))
    pool.pool.submit(Want("job-q", workers=1, shards=1, min_workers=1))
    await pool._heard(assignment_record(Assignment("job-q", 1, {0: "w-3"}, {}, {})))
    assert [job_id for job_id, _ in failures] == ["job-1", "job-1", "job-q"]
    assert failures[1][1].startswith("a release this coordinator did not write (epoch 1;")


async def test_a_queued_job_a_foreign_assignment_took_is_released_when_it_ends() -> None:
    failures: list[tuple[str, str]] = []
    pool = scheduler(failures)
    pool._producer = sent = SentEvents()  # type: ignore[assignment]
    pool.pool.submit(Want("job-q", workers=1, shards=1, min_workers=1))
    forged = Assignment("job-q", 7, {0: "w-3"}, {0: "s-1"}, {0: "h:1"})
    await pool._heard(assignment_record(forged))
    await pool.release("job-q")  # the job ended failed: the coordinator's monitor releases it
    (released,) = sent.sent
    assert (released["state"], released["job_id"], released["epoch"]) == (RELEASED, "job-q", 7)
    await pool.release("job-q")  # once
    assert len(sent.sent) == 1


def test_a_workers_unreachable_report_is_handed_to_the_pool_and_bad_ones_are_ignored() -> None:
    pool = scheduler([])
    pool.pool.resume(pool.pool.running["job-1"], Want("job-1", workers=2, shards=1, min_workers=1))
    pool.pool.running["job-1"].addresses[0] = "127.0.0.1:1"
    report = {"partition": 0, "member": "s-1", "address": "127.0.0.1:1"}
    for rank in (0, 1):
        pool.worker_report({"job_id": "job-1", "unreachable": {**report, "rank": rank}})
    pool.worker_report({"job_id": "job-1", "unreachable": {"partition": "x"}})
    pool.worker_report({"job_id": "job-1", "unreachable": "s-1"})
    pool.pool.heard("s-1", "shard", "127.0.0.1:1", now_ms=events.now_ms())
    pool.pool.heard("s-2", "shard", "10.0.0.2:7070", now_ms=events.now_ms())
    for member in ("w-3", "w-7"):
        pool.pool.heard(member, "worker", "", now_ms=events.now_ms())
    (change,) = pool.pool.schedule()
    assert change.assignment is not None and change.assignment.shards == {0: "s-2"}
    assert "no worker of the job could reach it at 127.0.0.1:1" in change.reason
