"""A shard that resumed from a checkpoint older than what a worker can push again (the worker
took its rank over after it, or its other partitions are past the shard): the worker says from
which version it can push (``PushesFrom``), and neither waits for the other until then."""

from __future__ import annotations

import numpy as np
import pytest

from maas.config import Settings
from maas.training.aggregate import Verdict
from maas.training.broadcast import ShardParams
from maas.training.prepare import Limits, PreparedJob, prepare_job
from maas.training.worker import WorkerJob, first_pushable
from tests.unit.test_training_aggregate import _core, _grad

SETTINGS = Settings(auth=False)


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
