"""A compress job held up by an outage (S3, the registry) says so in its status while the jobs
consumer redelivers it, once per note interval, and the failure still reaches the consumer."""

from __future__ import annotations

import pytest

from maas import events
from maas.bus import Record
from maas.errors import InvalidArgument, Unavailable


@pytest.fixture
def service(compressor_service):
    return compressor_service


def record(job_id: str) -> Record:
    event = {"type": "compress", "job_id": job_id}
    return Record("maas.jobs.v1", 0, 1, job_id, event)


def failing_with(service, error: Exception) -> None:
    async def handle(event):
        raise error

    service.core.handle = handle


async def test_an_outage_is_said_in_the_jobs_status_and_the_job_is_retried(service):
    failing_with(service, Unavailable("get s3://maas-checkpoints/x: S3 unreachable"))
    with pytest.raises(Unavailable):  # the consumer redelivers the job
        await service._handle(record("c-1"))
    (status,) = service.published
    assert status["job_id"] == "c-1" and status["state"] == "running"
    assert status["reason"] == "waiting: get s3://maas-checkpoints/x: S3 unreachable; retrying"


async def test_an_outage_is_noted_once_per_interval_not_once_per_retry(service, monkeypatch):
    failing_with(service, Unavailable("S3 unreachable"))
    for now_ms in (1_000, 2_000, 40_000):
        monkeypatch.setattr(events, "now_ms", lambda now_ms=now_ms: now_ms)
        with pytest.raises(Unavailable):
            await service._handle(record("c-2"))
    assert [s["ts"] for s in service.published] == [1_000, 40_000]  # not at 2 s


async def test_a_refusal_for_good_is_no_waiting(service):
    failing_with(service, InvalidArgument("compress.methods[0]: unknown method"))
    with pytest.raises(InvalidArgument):
        await service._handle(record("c-3"))
    assert service.published == []
