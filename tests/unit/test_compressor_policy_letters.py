"""What the compressor says when a record is dead-lettered: a failed status for a policy's plan
(whose promotion comes before its job says succeeded: a job ends once) or for a refused compress
job, but nothing (failed or queued) on a plan's status stream for a job taking a plan's id."""

from __future__ import annotations

import pytest

from maas import job_ids
from maas.deadletter import DeadLetter


@pytest.fixture
def service(compressor_service):
    return compressor_service


def letter_for(version: int) -> DeadLetter:
    event = {"event": "registered", "name": "m", "version": version}
    return DeadLetter("maas.models.v1", 0, 7, "m", b"", [], "unavailable", "registry away", event)


async def test_a_plan_that_could_not_run_fails_its_job(service):
    await service._policy_failed(letter_for(1))
    (status,) = service.published
    assert status["job_id"] == "policy-m-1" and status["state"] == "failed"
    assert service.metrics.promotions.labels("failed")._value.get() == 1


async def test_a_refused_job_under_a_plans_id_writes_nothing_on_the_plans_status_stream(service):
    job = {"type": "compress", "job_id": "policy-m-3"}
    refused = DeadLetter("maas.jobs.v1", 0, 9, "policy-m-3", b"", [], "invalid_argument", "", job)
    await service._failed(refused)
    assert service.published == []


async def test_a_refused_compress_job_fails_under_its_own_id(service):
    job = {"type": "compress", "job_id": "mine-1"}
    refused = DeadLetter("maas.jobs.v1", 0, 9, "mine-1", b"", [], "invalid_argument", "no", job)
    await service._failed(refused)
    (status,) = service.published
    assert status["job_id"] == "mine-1" and status["state"] == "failed"


def test_a_job_event_under_a_plans_id_is_not_told_it_is_queued(service):
    service._running = "long-job"
    assert service._waits("mine-2")
    assert not service._waits("policy-m-3")


async def test_a_job_under_an_id_another_job_holds_is_not_told_it_is_queued(service, monkeypatch):
    # Its status stream is the other job's: a `queued` there followed that job's `succeeded`.
    async def held(store, job_id, content_sha256):
        return True

    monkeypatch.setattr(job_ids, "held_by_another", held)
    service._running = "long-job"
    await service._announce_queued("taken-1", {"job_id": "taken-1", "type": "compress"})
    assert service.published == []


async def test_a_job_waiting_behind_another_is_told_it_is_queued(service, monkeypatch):
    async def free(store, job_id, content_sha256):
        return False

    monkeypatch.setattr(job_ids, "held_by_another", free)
    service._running = "long-job"
    await service._announce_queued("mine-3", {"job_id": "mine-3", "type": "compress"})
    (status,) = service.published
    assert status["state"] == "queued" and "long-job" in status["reason"]
