"""A shard that resumed from a checkpoint older than what a worker can push again (the worker
took its rank over after it, or its other partitions are past the shard): the worker says from
which version it can push (``PushesFrom``), and neither waits for the other until then."""

from __future__ import annotations

import numpy as np
import pytest
from pool_kit import SentEvents

from maas.config import Settings
from maas.training.aggregate import ShardCore, Verdict
from maas.training.broadcast import ShardParams
from maas.training.pool import Assignment
from maas.training.prepare import Limits, PreparedJob, prepare_job
from maas.training.protocol import GradientAssembler
from maas.training.worker import WorkerJob, first_pushable
from services.aggregator.shard import ShardService
from services.aggregator.shard_job import Peer, ShardJob, StatusReporter
from tests.unit.test_training_aggregate import _core, _grad


def test_a_worker_that_kept_everything_since_the_shards_version_pushes_all_of_it() -> None:
    assert first_pushable(shard_version=40, kept=(40, 46), next_version=47) is None


def test_a_push_still_on_its_way_counts_as_kept() -> None:
    assert first_pushable(shard_version=46, kept=(46, 46), next_version=47) is None


def test_a_process_that_took_the_rank_after_the_checkpoint_pushes_from_its_first_kept() -> None:
    assert first_pushable(shard_version=40, kept=(43, 46), next_version=47) == 43


def test_a_fresh_process_pushes_from_the_newest_version_it_was_sent() -> None:
    assert first_pushable(shard_version=40, kept=None, next_version=47) == 47


def test_a_worker_whose_kept_pushes_end_early_pushes_from_the_newest_version() -> None:
    assert first_pushable(shard_version=40, kept=(38, 44), next_version=47) == 47


def test_a_shard_at_the_newest_version_waits_for_nothing_missing() -> None:
    assert first_pushable(shard_version=47, kept=None, next_version=47) is None


@pytest.fixture(scope="module")
def prepared() -> PreparedJob:
    return prepare_job(
        {
            "job_id": "w",
            "type": "train",
            "model": {"arch": "mlp", "config": {"hidden": [8]}},
            "dataset": {"uri": "builtin:digits"},
            "training": {"steps": 50, "workers": 2, "shards": 2},
        },
        limits=Limits(1000, max_workers=2, max_shards=2),
    )


def _params(prepared: PreparedJob, shard: int, version: int) -> ShardParams:
    size = prepared.plan.partitions[shard].size
    return ShardParams(version, np.zeros(size, dtype=np.float32), False)


@pytest.fixture
def skewed(prepared: PreparedJob) -> WorkerJob:
    """A fresh worker whose partition 1 was sent version 40 (its shard resumed from an older
    checkpoint) while partition 0 is at 47."""
    job = WorkerJob(
        prepared.plan, 1, prepared.state, prepared.dataset, chunk_bytes=1 << 20, overlap_min_bytes=0
    )
    job.receive(0, _params(prepared, 0, 47))
    job.receive(1, _params(prepared, 1, 40))
    return job


def test_a_worker_computes_only_on_one_version_of_every_partition(
    prepared: PreparedJob, skewed: WorkerJob
) -> None:
    assert not skewed.ready()
    skewed.receive(1, _params(prepared, 1, 47))
    assert skewed.ready()


def test_a_fresh_worker_tells_the_shard_behind_to_expect_it_from_the_newest_version(
    skewed: WorkerJob,
) -> None:
    assert skewed.pushes_from(1, 40, oldest_kept=None) == 47
    assert skewed.pushes_from(0, 47, oldest_kept=None) is None


def test_a_deferred_workers_push_below_its_version_is_dropped() -> None:
    core = _core(workers=2)
    core.defer(1, 2, now_ms=0)
    assert core.offer(_grad(1, 0, value=3.0), now_ms=1) is Verdict.STALE
    core.offer(_grad(0, 0), now_ms=2)
    assert core.version == 1
    np.testing.assert_array_equal(core.theta, np.full(core.partition.size, -1.0))


def _shard_serving(
    prepared: PreparedJob, version: int
) -> tuple[ShardService, ShardJob, SentEvents]:
    """A shard serving partition 1 at ``version``, both ranks joined (no network: the
    statuses it sends are recorded)."""
    service, sent = ShardService(Settings(auth=False)), SentEvents()
    service._reporter = StatusReporter(sent, "aggregator-t")  # type: ignore[arg-type]
    plan = prepared.plan
    size = plan.partitions[1].size
    job = ShardJob(
        plan,
        1,
        Assignment("w", 1, {0: "w-0", 1: "w-1"}, {0: "s-0", 1: "s-1"}, {}),
        ShardCore(plan, 1, np.zeros(size, dtype=np.float32), now_ms=0, version=version),
        GradientAssembler(plan.training.gradient_codec, size),
        started_ms=0,
        checkpointed_version=version,
        durable_version=version,
    )
    job.peers = {rank: Peer("w", 1, rank) for rank in (0, 1)}
    service.jobs[("w", 1)] = job
    return service, job, sent


async def test_a_shard_told_a_rank_pushes_later_goes_on_without_it_and_says_so(
    prepared: PreparedJob,
) -> None:
    service, job, sent = _shard_serving(prepared, version=40)
    await service.on_pushes_from(job.peers[1], 43)
    await service._reporter.drain()  # statuses go out in the background
    assert job.core.members == {0}
    (status,) = sent.sent
    assert "worker 1 can push partition 1 from version 43 on only" in status["workers"]["change"]
    assert "versions 40..42 go on without that rank" in status["workers"]["change"]


async def test_a_shard_ignores_pushes_from_of_a_stream_no_longer_holding_the_rank(
    prepared: PreparedJob,
) -> None:
    service, job, sent = _shard_serving(prepared, version=40)
    await service.on_pushes_from(Peer("w", 1, 1), 43)  # an older stream of rank 1
    job.assignment.workers.pop(0)  # the coordinator took rank 0 away
    await service.on_pushes_from(job.peers[0], 43)
    await service._reporter.drain()
    assert job.core.members == {0, 1} and not sent.sent
