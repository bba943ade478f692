"""Following jobs on the real broker (``maas jobs list`` and ``watch``): status events read from
the beginning without a consumer group, what is not a valid status skipped."""

from __future__ import annotations

import uuid

import pytest

from maas import jobs, topics
from maas.bus import EventProducer
from maas.errors import DeadlineExceeded

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@pytest.fixture
async def producer(stack):
    async with EventProducer(stack.settings, client_id="test-jobs-status") as p:
        yield p


async def publish(producer: EventProducer, job_id: str, *states: str) -> None:
    for step, state in enumerate(states):
        event = jobs.status_event(job_id, state, service="test", step=step)
        await producer.send(topics.JOB_STATUS, event, key=job_id)


async def test_the_summaries_end_at_the_log_end_and_skip_what_is_not_a_status(stack, producer):
    job_id = f"job-{uuid.uuid4().hex[:10]}"
    await producer.send_raw(topics.JOB_STATUS, b"\xc1 not msgpack", key=job_id)
    await publish(producer, job_id, "accepted", "running", "succeeded")

    summary = (await jobs.summaries(stack.settings))[job_id]

    assert summary.state == "succeeded" and summary.step == 2
    assert [e["state"] for e in summary.history] == ["accepted", "running", "succeeded"]


async def test_watch_yields_each_status_until_the_job_is_terminal(stack, producer):
    job_id = f"job-{uuid.uuid4().hex[:10]}"
    await publish(producer, job_id, "running", "failed")
    await publish(producer, f"other-{job_id}", "running")

    seen = [s.state async for s in jobs.watch(stack.settings, job_id, timeout_s=60)]

    assert seen == ["running", "failed"]


async def test_a_job_is_known_once_a_service_reported_on_it(stack, producer):
    job_id = f"job-{uuid.uuid4().hex[:10]}"
    assert not await jobs.has_status(stack.settings, job_id)  # cancel/watch say so at once
    await publish(producer, job_id, "accepted")
    assert await jobs.has_status(stack.settings, job_id)


async def test_watching_a_job_no_service_reported_on_says_where_to_look_not_that_it_goes_on(stack):
    job_id = f"job-{uuid.uuid4().hex[:10]}"
    with pytest.raises(DeadlineExceeded) as waited:
        async for _ in jobs.watch(stack.settings, job_id, timeout_s=2):
            pass
    assert "no service reported on job" in waited.value.message
    assert topics.DLQ.name in waited.value.message and "goes on" not in waited.value.message


async def test_watching_a_running_job_past_its_timeout_says_it_goes_on(stack, producer):
    job_id = f"job-{uuid.uuid4().hex[:10]}"
    await publish(producer, job_id, "running")
    with pytest.raises(DeadlineExceeded, match="last seen: running; it goes on"):
        async for _ in jobs.watch(stack.settings, job_id, timeout_s=2):
            pass
