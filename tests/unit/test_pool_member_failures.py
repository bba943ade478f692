"""A worker that cannot compute a step says why in a heartbeat; the coordinator's pool scheduler
hands the reason on for the job that worker has a rank in, and ignores it otherwise."""

from __future__ import annotations

from typing import Any

from maas import events, topics
from maas.bus import EventProducer, Record
from maas.config import Settings
from maas.errors import Unavailable
from maas.training.control import FAILURE_MESSAGE_CHARS, Heartbeat, Identity, member_event
from maas.training.pool import Assignment
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


class SentEvents:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    async def send(self, topic: object, event: dict[str, Any], key: str) -> None:
        self.sent.append(event)


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
