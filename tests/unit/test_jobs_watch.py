"""`maas jobs watch` shows, above its progress bar, each reason a running job's status gives:
what a queued job waits for, a worker removed or joined."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from maas import cli_jobs, jobs
from maas.config import Settings


def summary(state: str, reason: str = "", step: int = 0) -> jobs.JobSummary:
    return jobs.JobSummary("j", state=state, step=step, total_steps=100, reason=reason)


def test_a_watch_prints_what_the_job_waits_for_once_each_time_it_changes(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    waiting = "waiting for 40 free gradient workers (training.min_workers); the pool has 3"
    statuses = [
        summary("queued", waiting),
        summary("queued", waiting),  # said again by the next status: printed once
        summary("running", "worker w-1 (rank 1) removed: no heartbeat", step=5),
        summary("running", step=6),
        summary("succeeded", step=100),
    ]

    async def watch(settings: Settings, job_id: str, **_: object) -> AsyncIterator[jobs.JobSummary]:
        for status in statuses:
            yield status

    monkeypatch.setattr(jobs, "watch", watch)
    cli_jobs.console.cache_clear()
    asyncio.run(cli_jobs.follow(Settings(), "j", None))
    out = capsys.readouterr().out
    assert out.count("waiting for 40 free gradient workers") == 1
    assert "worker w-1 (rank 1) removed: no heartbeat" in out
