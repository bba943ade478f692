"""Which rows each worker trains on: disjoint shards that cover the training set, and a fresh
seeded permutation of a worker's shard every epoch."""

from __future__ import annotations

import numpy as np
import pytest

from maas.datasets import Dataset
from maas.errors import InvalidArgument
from maas.training.sampler import Permutations, batch_indices

ROWS = 103  # not a multiple of the worker count or the batch size


def _dataset() -> Dataset:
    ids = np.arange(ROWS, dtype=np.float32).reshape(-1, 1)  # each row's feature is its id
    return Dataset("ids", "regression", ids, ids[:, 0], ids[:0], ids[:0, 0])


def _rows(x: np.ndarray) -> list[int]:
    return [int(v) for v in x[:, 0]]


@pytest.mark.parametrize("workers", [1, 2, 3, 4])
def test_worker_shards_are_disjoint_and_their_union_is_the_training_set(workers: int) -> None:
    shards = [_rows(_dataset().shard(w, workers)[0]) for w in range(workers)]
    union = [row for shard in shards for row in shard]
    assert sorted(union) == list(range(ROWS))  # every row once: disjoint and complete
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def _epoch(rows: int, batch: int, epoch: int, worker: int) -> np.ndarray:
    steps = rows // batch
    picks = [
        batch_indices(rows, batch, step, seed=7, worker=worker)
        for step in range(epoch * steps, (epoch + 1) * steps)
    ]
    return np.concatenate(picks)


def test_one_epoch_of_batches_visits_every_row_of_the_shard_once() -> None:
    seen = _epoch(rows=60, batch=10, epoch=0, worker=0)
    assert sorted(seen.tolist()) == list(range(60))


def test_each_epoch_is_a_fresh_permutation() -> None:
    first, second = _epoch(60, 10, 0, 0), _epoch(60, 10, 1, 0)
    assert sorted(second.tolist()) == list(range(60))
    assert not np.array_equal(first, second)


def test_a_batch_that_crosses_an_epoch_boundary_wraps_into_the_next_permutation() -> None:
    batch = batch_indices(25, 10, 2, seed=7, worker=0)  # rows 20..29 of the stream: 5 + 5
    assert len(set(batch[:5].tolist())) == 5 and len(set(batch[5:].tolist())) == 5
    np.testing.assert_array_equal(batch[5:], batch_indices(25, 5, 5, seed=7, worker=0))


def test_workers_at_the_same_step_train_on_different_rows() -> None:
    dataset = _dataset()
    picked = []
    for worker in range(2):
        x, _ = dataset.shard(worker, 2)
        picked.append(set(_rows(x[batch_indices(len(x), 8, 3, seed=7, worker=worker)])))
    assert not picked[0] & picked[1]


def test_the_batch_for_a_step_is_the_same_every_time() -> None:
    a = batch_indices(50, 16, 9, seed=1, worker=1)
    np.testing.assert_array_equal(a, batch_indices(50, 16, 9, seed=1, worker=1))


def test_a_bad_request_is_named() -> None:
    with pytest.raises(InvalidArgument, match="rows=0, batch_size=4, step=0"):
        batch_indices(0, 4, 0, seed=0, worker=0)


def test_the_permutations_kept_stay_within_their_byte_budget() -> None:
    rows = 10_000  # 80 kB a permutation
    kept = Permutations(budget=200_000)
    for step in range(20):  # 20 epochs: each batch is the whole shard
        batch_indices(rows, rows, step, seed=1, worker=0, permutations=kept)
    assert kept.held_bytes <= 200_000


def test_a_permutation_dropped_from_the_cache_is_the_same_when_made_again() -> None:
    tiny = Permutations(budget=1)  # only the newest is kept
    first = batch_indices(100, 10, 0, seed=3, worker=1, permutations=tiny).copy()
    batch_indices(100, 100, 5, seed=3, worker=1, permutations=tiny)  # another epoch evicts it
    np.testing.assert_array_equal(
        batch_indices(100, 10, 0, seed=3, worker=1, permutations=tiny), first
    )
