"""When a shard reports a job's progress: every interval, and every 1/20 of its steps."""

from __future__ import annotations

from services.aggregator.shard_job import progress_due


def due(now_ms: int, version: int, total: int = 300) -> bool:
    return progress_due(
        now_ms=now_ms,
        reported_ms=1_000,
        interval_ms=2_000,
        version=version,
        reported=30,
        total=total,
    )


def test_a_long_job_reports_every_interval():
    assert not due(now_ms=2_999, version=31, total=100_000)
    assert due(now_ms=3_000, version=31, total=100_000)


def test_a_short_job_reports_every_twentieth_of_its_steps_before_the_interval():
    assert not due(now_ms=1_100, version=44)  # 14 of the 15 steps a twentieth of 300 is
    assert due(now_ms=1_100, version=45)


def test_a_job_of_fewer_than_twenty_steps_reports_every_step():
    assert due(now_ms=1_050, version=31, total=7)
