"""What the compressor says when a policy's event is dead-lettered: a failed status for the
plan, whose promotion comes before its job says succeeded (a job ends once)."""

from __future__ import annotations

import pytest

from maas.config import Settings
from maas.deadletter import DeadLetter
from services.compressor.service import CompressorService


@pytest.fixture
async def service():
    made = CompressorService(Settings.from_env())
    made.published = []

    async def publish(event):
        made.published.append(event)

    made._publish = publish
    return made


def letter_for(version: int) -> DeadLetter:
    event = {"event": "registered", "name": "m", "version": version}
    return DeadLetter("maas.models.v1", 0, 7, "m", b"", [], "unavailable", "registry away", event)


async def test_a_plan_that_could_not_run_fails_its_job(service):
    await service._policy_failed(letter_for(1))
    (status,) = service.published
    assert status["job_id"] == "policy-m-1" and status["state"] == "failed"
    assert service.metrics.promotions.labels("failed")._value.get() == 1
