"""The coordinator's monitor of a running job, with S3 and Kafka faked and time passed in: the
stall timeout counts from the last progress through the outages it waits out, what it waits for
is in the job's status, and a queued job that a foreign assignment took ends too."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from pool_kit import SentEvents, ticking_clock

from maas import events
from maas.config import Settings
from maas.errors import InvalidArgument, NotFound, Unavailable
from maas.training import checkpoint as ck
from maas.training.pool import Want
from services.aggregator import monitor as monitor_module
from services.aggregator.coordinator import Coordinator

STALL_MS = 10_000
TICK_MS = 1_000  # how far the fake clock moves each time it is read
GIVE_UP = 300  # pointer reads before the fake S3 ends the test with a non-retriable error


class FlakyStore:
    """A job at version 5 for good, whose S3 fails every third pointer read (a flaky S3)."""

    def __init__(self) -> None:
        self.reads = 0
        self.results: dict[str, dict[str, Any]] = {}
        self.parent: dict[str, Any] | None = None  # a fine-tune's base

    async def read_result(self, job_id: str) -> dict[str, Any] | None:
        return self.results.get(job_id)

    async def read_plan(self, job_id: str) -> Any:
        return SimpleNamespace(shards=1, job_id=job_id, parent=self.parent)

    async def pointer(self, job_id: str, shard: int) -> ck.Pointer:
        self.reads += 1
        if self.reads > GIVE_UP:
            raise InvalidArgument("the test gave up: the job never stalled")
        if self.reads % 3 == 0:
            raise Unavailable("get LATEST.json: S3 at test:1 is unreachable")
        return ck.Pointer(version=5, key="k", sha256="")

    async def write_result(self, job_id: str, result: dict[str, Any]) -> None:
        self.results[job_id] = result

    async def clear_active(self, job_id: str) -> None:
        pass


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    now = ticking_clock(monkeypatch, TICK_MS)
    monkeypatch.setattr(monitor_module, "POLL_S", 0)
    monkeypatch.setattr(monitor_module, "RETRY_S", 0)
    yield now


def coordinator() -> tuple[Coordinator, FlakyStore, SentEvents]:
    c = Coordinator(Settings(job_stall_timeout_ms=STALL_MS))
    store, producer = FlakyStore(), SentEvents()
    c._store = c._monitor._store = store  # type: ignore[assignment]
    c._producer = producer  # type: ignore[assignment]
    return c, store, producer


async def test_a_flaky_s3_does_not_restart_the_stall_timeout(clock: list[int]) -> None:
    c, store, producer = coordinator()
    await c._monitor._follow("job-1")
    error = store.results["job-1"]["error"]
    assert error["code"] == "deadline_exceeded", error
    assert f"no progress for {STALL_MS} ms (shard versions [5])" in error["message"]
    (failed,) = [e for e in producer.sent if e["state"] == "failed"]
    assert failed["job_id"] == "job-1"


async def test_an_outage_the_monitor_waits_out_is_in_the_status_rate_limited(
    clock: list[int],
) -> None:
    c, store, producer = coordinator()
    await c._monitor._follow("job-1")
    waiting = [e for e in producer.sent if e["state"] == "running"]
    retries = store.reads // 3
    assert retries >= 3 and len(waiting) == 1  # said once, not at each of the retries
    assert waiting[0]["reason"] == "waiting: get LATEST.json: S3 at test:1 is unreachable; retrying"
    events.validate(waiting[0], events.JOB_STATUS)


async def test_an_outage_the_monitor_waits_out_is_logged_rate_limited_too(
    clock: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    c, store, _ = coordinator()
    with caplog.at_level(logging.DEBUG, logger=monitor_module.__name__):
        await c._monitor._follow("job-1")
    retrying = [r for r in caplog.records if "retrying" in r.getMessage()]
    warned = [r for r in retrying if r.levelno == logging.WARNING]
    assert store.reads // 3 >= 3 and len(retrying) >= 3 and len(warned) == 1


async def test_a_queued_job_taken_by_a_foreign_assignment_fails_and_leaves_the_queue(
    clock: list[int],
) -> None:
    c, store, producer = coordinator()
    c._pool.pool.submit(Want("job-q", workers=1, shards=1, min_workers=1))
    c._member_failed("job-q", "an assignment this coordinator did not write (epoch 999)")
    await c._monitor._tasks["job-q"]
    assert store.results["job-q"]["state"] == "failed"
    assert "did not write (epoch 999)" in store.results["job-q"]["error"]["message"]
    assert [e["state"] for e in producer.sent] == ["failed"]
    assert "job-q" not in c._pool.pool.queue


class DeletedVersions:
    """A registry that knows every version as deleted."""

    async def get(self, ref: str) -> Any:
        raise NotFound(f"model {ref} was deleted")


async def test_a_finetune_whose_base_is_deleted_fails_at_once_naming_it(clock: list[int]) -> None:
    c, store, _ = coordinator()
    store.parent = {"name": "digits", "version": 5}
    c._finisher._registry = DeletedVersions()  # type: ignore[assignment]
    await c._monitor._follow("job-1")
    error = store.results["job-1"]["error"]
    assert error["code"] == "failed_precondition"
    assert error["message"].startswith(
        "the job's base digits@5 is gone (model digits@5 was deleted); a model fine-tuned from it "
        "cannot be registered"
    )
    assert store.reads <= 2  # at the first poll, not after its stall timeout
