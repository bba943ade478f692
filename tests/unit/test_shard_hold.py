"""A shard holds a version back while its newest durable checkpoint is too far behind: the
bound on what workers keep for a replay (``held_back``), and so a push further ahead than a
replay can be is refused (``check_ahead``)."""

from types import SimpleNamespace

import pytest

from maas.errors import InvalidArgument
from services.aggregator.shard_job import ShardJob, StatusReporter, check_ahead, held_back
from tests.unit.pool_kit import SentEvents


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
    job = SimpleNamespace(
        job_id="j",
        plan=SimpleNamespace(target_version=400),
        partition=1,
        durable_version=20,
        core=SimpleNamespace(version=61),
    )
    await reporter.hold(job)  # type: ignore[arg-type]
    await reporter.drain()
    [status] = sent.sent
    assert (status["state"], status["step"]) == ("running", 61)
    assert status["reason"] == (
        "partition 1 is waiting for a checkpoint to land in S3 (newest durable: version 20) "
        "before sending version 61"
    )
