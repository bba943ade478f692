"""A shard holds a version back while its newest durable checkpoint is too far behind: the
bound on what workers keep for a replay (``held_back``), and so a push further ahead than a
replay can be is refused (``check_ahead``)."""

from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry, Counter

from maas.errors import InvalidArgument
from services.aggregator import shard_job
from services.aggregator.shard_job import (
    SLOW_HOLD_MS,
    CheckpointWriter,
    ShardJob,
    StatusReporter,
    check_ahead,
    held_back,
)
from tests.unit.pool_kit import SentEvents, held_job


def test_versions_within_two_checkpoint_intervals_of_the_durable_one_go_out() -> None:
    assert not held_back(version=40, durable=0, checkpoint_every=20)
    assert not held_back(version=61, durable=21, checkpoint_every=20)


def test_a_version_past_two_intervals_is_held() -> None:
    assert held_back(version=41, durable=0, checkpoint_every=20)


def test_a_landed_checkpoint_releases_the_held_version() -> None:
    assert held_back(version=41, durable=0, checkpoint_every=20)
    assert not held_back(version=41, durable=20, checkpoint_every=20)


def test_checkpointing_every_step_holds_a_version_two_past_the_durable_one() -> None:
    assert not held_back(version=2, durable=0, checkpoint_every=1)
    assert held_back(version=3, durable=0, checkpoint_every=1)


def _job(version: int, checkpoint_every: int, staleness: int = 0) -> ShardJob:
    training = SimpleNamespace(checkpoint_every=checkpoint_every, staleness=staleness)
    return SimpleNamespace(
        plan=SimpleNamespace(training=training), core=SimpleNamespace(version=version)
    )  # type: ignore[return-value]


def test_a_push_as_far_ahead_as_a_replay_can_be_is_taken() -> None:
    check_ahead(100 + 2 * 20 + 1, _job(100, checkpoint_every=20))
    check_ahead(100 + 2 * 20 + 1 + 3, _job(100, checkpoint_every=20, staleness=3))


def test_a_push_further_ahead_than_any_replay_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="push version 142 is 42 past the shard's 100"):
        check_ahead(142, _job(100, checkpoint_every=20))


async def test_the_shard_of_any_partition_that_holds_the_job_says_why_in_its_status() -> None:
    # Only partition 0's shard reports progress; a hold on another partition stops the job
    # just the same, so that shard reports it itself.
    sent = SentEvents()
    reporter = StatusReporter(sent, "aggregator-1")  # type: ignore[arg-type]
    await reporter.hold(held_job(partition=1))
    await reporter.drain()
    [status] = sent.sent
    assert (status["state"], status["step"]) == ("running", 61)
    assert status["reason"] == (
        "partition 1 is waiting for a checkpoint to land in S3 (newest durable: version 20) "
        "before sending version 61"
    )


def _joinable(version: int, durable: int) -> ShardJob:
    return ShardJob(
        plan=None,  # type: ignore[arg-type]
        partition=0,
        assignment=None,  # type: ignore[arg-type]
        core=SimpleNamespace(version=version),  # type: ignore[arg-type]
        assembler=None,  # type: ignore[arg-type]
        started_ms=1,
        checkpointed_version=durable,
        durable_version=durable,
    )


def test_a_new_process_taking_a_rank_past_the_durable_checkpoint_makes_one_due_now() -> None:
    # The worker it replaced kept the pushes since version 40; they died with it, so a shard
    # restarted from 40 would wait for them for good: a checkpoint at 57 is due.
    job = _joinable(version=57, durable=40)
    job.rank_members[0] = "worker-a"
    assert job.joined_by(0, "worker-b")
    assert job.checkpoint_due == 57


def test_the_same_process_reconnecting_or_a_join_at_the_durable_version_needs_none() -> None:
    job = _joinable(version=57, durable=40)
    job.rank_members[0] = "worker-a"
    assert not job.joined_by(0, "worker-a")  # its stream broke; it keeps its pushes
    at_checkpoint = _joinable(version=40, durable=40)
    assert not at_checkpoint.joined_by(1, "worker-c")  # nothing since the checkpoint to lose
    assert job.checkpoint_due == at_checkpoint.checkpoint_due == 0


def test_a_hold_is_told_once_and_only_once_it_has_lasted_long() -> None:
    # A small job checkpointing every few steps is held for a few milliseconds at each
    # checkpoint: that is not a slow S3, and warning of it every time flooded the log.
    job = _joinable(version=57, durable=40)
    job.hold_from(1_000)
    assert not job.hold_to_tell(1_000 + SLOW_HOLD_MS - 1)
    assert job.hold_to_tell(1_000 + SLOW_HOLD_MS)
    assert not job.hold_to_tell(1_000 + 10 * SLOW_HOLD_MS)
    job.hold_from(50_000)  # the next hold is told again once it is long
    assert job.hold_to_tell(50_000 + SLOW_HOLD_MS)


class _Checkpoints:
    async def write_checkpoint(self, *args: object) -> None:
        return None


def _writer(reporter: StatusReporter, report_every_ms: int) -> CheckpointWriter:
    written = Counter("written", "checkpoints", registry=CollectorRegistry())
    return CheckpointWriter(_Checkpoints(), reporter, written, report_every_ms)  # type: ignore[arg-type]


def _checkpointing(version: int) -> ShardJob:
    job = _joinable(version=version, durable=0)
    job.plan = SimpleNamespace(job_id="j")  # type: ignore[assignment]
    job.assignment = SimpleNamespace(epoch=1)  # type: ignore[assignment]
    job.core = SimpleNamespace(  # type: ignore[assignment]
        version=version, snapshot=lambda: None, stats=SimpleNamespace(samples=0)
    )
    return job


async def _checkpoint(writer: CheckpointWriter, job: ShardJob, version: int) -> None:
    job.core.version = version
    task = writer.start(job, final=False)
    assert task is not None
    await task


async def test_checkpoints_closer_than_the_progress_interval_are_reported_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(shard_job.ck, "encode_snapshot", lambda snapshot: b"")
    clock = [10_000]
    monkeypatch.setattr(shard_job, "now_ms", lambda: clock[0])
    sent = SentEvents()
    reporter = StatusReporter(sent, "aggregator-0")  # type: ignore[arg-type]
    writer, job = _writer(reporter, report_every_ms=2_000), _checkpointing(1)
    for version in (1, 2, 3):  # every few milliseconds: the first only
        await _checkpoint(writer, job, version)
        clock[0] += 5
    clock[0] += 2_000
    await _checkpoint(writer, job, 4)
    await reporter.drain()
    assert [(s["state"], s["step"]) for s in sent.sent] == [
        ("checkpointed", 1),
        ("checkpointed", 4),
    ]
    assert job.durable_version == 4
