"""A shard's step rules: sync quorum and members, async staleness, duplicates, replays."""

from __future__ import annotations

import numpy as np
import pytest

from maas.training.aggregate import (
    Contribution,
    GradientSum,
    ShardCore,
    SyncRule,
    Verdict,
    accepts_staleness,
)
from maas.training.codecs import DenseGradient, Fp16Codec, TopKCodec
from maas.training.layout import FlatLayout, horizontal
from maas.training.optim import OptimizerSpec
from maas.training.plan import JobPlan, TrainingSpec

SIZE = 8


def _plan(**training: object) -> JobPlan:
    layout = FlatLayout.from_shapes([("w", [SIZE])])
    spec = TrainingSpec(steps=3, optimizer=OptimizerSpec("sgd", lr=1.0), **training)  # type: ignore[arg-type]
    return JobPlan(
        job_id="j",
        kind="train",
        arch="mlp",
        config={},
        dataset_uri="builtin:digits",
        dataset_task="classification",
        dataset_fraction=1.0,
        training=spec,
        loss="cross_entropy",
        total_steps=3,
        layout=layout,
        partitions=tuple(horizontal(layout, 1)),
        register_name="m",
    )


def _core(**training: object) -> ShardCore:
    return ShardCore(_plan(**training), 0, np.zeros(SIZE, dtype=np.float32), now_ms=0)


def _grad(worker: int, version: int, value: float = 1.0) -> Contribution:
    values = np.full(SIZE, value, dtype=np.float32)
    return Contribution(worker, version, samples=4, decode=lambda: DenseGradient(values))


def test_sync_step_waits_for_every_worker_at_full_quorum() -> None:
    core = _core(workers=2)
    assert core.offer(_grad(0, 0), now_ms=1) is Verdict.ACCEPTED
    assert core.version == 0
    core.offer(_grad(1, 0, value=3.0), now_ms=2)
    assert core.version == 1
    np.testing.assert_array_equal(core.theta, np.full(SIZE, -2.0))  # lr 1, mean of 1 and 3


def test_sum_reduce_adds_the_gradients() -> None:
    core = _core(workers=2, reduce="sum")
    core.offer(_grad(0, 0), now_ms=1)
    core.offer(_grad(1, 0, value=3.0), now_ms=1)
    np.testing.assert_array_equal(core.theta, np.full(SIZE, -4.0))


def test_quorum_closes_the_step_without_the_slow_worker() -> None:
    core = _core(workers=4, quorum=0.5)
    core.offer(_grad(0, 0), now_ms=1)
    assert core.version == 0
    core.offer(_grad(1, 0), now_ms=1)
    assert core.version == 1
    assert core.offer(_grad(2, 0), now_ms=2) is Verdict.STALE


def test_below_full_quorum_the_deadline_closes_the_step_with_whoever_reported() -> None:
    core = _core(workers=4, quorum=0.75, step_deadline_ms=100)
    core.offer(_grad(0, 0), now_ms=10)
    assert not core.tick(now_ms=99)
    assert core.tick(now_ms=100)
    assert core.version == 1


def test_at_full_quorum_no_deadline_closes_a_step_without_every_member() -> None:
    core = _core(workers=2, step_deadline_ms=100)
    core.offer(_grad(0, 0), now_ms=10)
    assert not core.tick(now_ms=10**9)
    assert core.version == 0


def test_deadline_never_closes_an_empty_step() -> None:
    core = _core(workers=2, quorum=0.5, step_deadline_ms=100)
    assert not core.tick(now_ms=10_000)
    assert core.version == 0


def test_removing_the_missing_member_closes_the_step_with_the_others() -> None:
    core = _core(workers=3)
    core.offer(_grad(0, 0), now_ms=1)
    core.offer(_grad(1, 0, value=3.0), now_ms=1)
    assert core.remove(2, now_ms=2)
    assert core.version == 1 and core.members == {0, 1}
    np.testing.assert_array_equal(core.theta, np.full(SIZE, -2.0))  # the mean of the two
    assert not core.remove(2, now_ms=3)


def test_a_removed_worker_that_sends_again_is_waited_for_again() -> None:
    core = _core(workers=2)
    core.remove(1, now_ms=1)
    core.offer(_grad(0, 0), now_ms=2)
    assert core.version == 1
    core.offer(_grad(1, 1), now_ms=3)
    assert core.members == {0, 1} and core.version == 1
    core.offer(_grad(0, 1), now_ms=4)
    assert core.version == 2


def test_a_duplicate_gradient_changes_nothing() -> None:
    core = _core(workers=2)
    core.offer(_grad(0, 0), now_ms=1)
    assert core.offer(_grad(0, 0, value=100.0), now_ms=1) is Verdict.DUPLICATE
    core.offer(_grad(1, 0), now_ms=1)
    np.testing.assert_array_equal(core.theta, np.full(SIZE, -1.0))


def test_a_gradient_for_a_newer_version_never_closes_the_open_step() -> None:
    # Re-sent gradients reach a restarted shard from many streams in no common order.
    core = _core(workers=2)
    core.offer(_grad(0, 0), now_ms=1)
    assert core.offer(_grad(0, 1), now_ms=1) is Verdict.EARLY
    assert core.version == 0
    core.offer(_grad(1, 0), now_ms=1)
    core.offer(_grad(1, 1), now_ms=1)
    assert core.version == 2


def test_an_early_gradient_is_held_until_its_version_comes_up() -> None:
    core = _core(workers=2)
    assert core.offer(_grad(0, 1, value=5.0), now_ms=1) is Verdict.EARLY
    core.offer(_grad(0, 0), now_ms=1)
    core.offer(_grad(1, 0), now_ms=1)
    assert core.version == 1
    core.offer(_grad(1, 1, value=5.0), now_ms=1)
    assert core.version == 2
    np.testing.assert_array_equal(core.theta, np.full(SIZE, -6.0))


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_an_early_gradient_sent_again_is_held_once_and_the_first_counts(mode: str) -> None:
    core = _core(workers=1, mode=mode)
    for value in (5.0, 7.0, 7.0):
        assert core.offer(_grad(0, 1, value=value), now_ms=1) is Verdict.EARLY
    assert core.held_count == 1
    core.offer(_grad(0, 0), now_ms=1)
    assert core.version == 2 and core.held_count == 0
    np.testing.assert_array_equal(core.theta, np.full(SIZE, -6.0))


def test_async_applies_on_arrival() -> None:
    core = _core(workers=2, mode="async", staleness=1)
    core.offer(_grad(0, 0), now_ms=1)
    core.offer(_grad(1, 0), now_ms=1)  # one version stale: allowed
    assert core.version == 2
    np.testing.assert_array_equal(core.theta, np.full(SIZE, -2.0))


def test_async_rejects_gradients_staler_than_the_bound() -> None:
    core = _core(workers=3, mode="async", staleness=1)
    core.offer(_grad(0, 0), now_ms=1)
    core.offer(_grad(1, 0), now_ms=1)
    assert core.offer(_grad(2, 0), now_ms=1) is Verdict.STALE
    assert core.version == 2


def test_async_replay_of_an_applied_gradient_is_a_duplicate() -> None:
    core = _core(workers=2, mode="async", staleness=4)
    core.offer(_grad(0, 0), now_ms=1)
    assert core.offer(_grad(0, 0), now_ms=2) is Verdict.DUPLICATE
    assert core.version == 1


def test_a_done_shard_ignores_more_gradients() -> None:
    core = _core(workers=1)
    for v in range(3):
        core.offer(_grad(0, v), now_ms=1)
    assert core.done
    assert core.offer(_grad(0, 3), now_ms=1) is Verdict.STALE


def test_restore_from_a_snapshot_continues_identically() -> None:
    a = _core(workers=1, mode="async", staleness=0)
    a.offer(_grad(0, 0, value=2.0), now_ms=1)
    b = ShardCore.restore(a.plan, 0, a.snapshot(), now_ms=5)
    assert b.offer(_grad(0, 0), now_ms=6) is Verdict.DUPLICATE
    for core in (a, b):
        core.offer(_grad(0, 1, value=0.5), now_ms=7)
    np.testing.assert_array_equal(a.theta, b.theta)
    assert b.version == 2


@pytest.mark.parametrize(
    ("workers", "quorum", "need"),
    [(1, 1.0, 1), (2, 0.5, 1), (3, 0.5, 2), (4, 0.75, 3), (5, 0.01, 1)],
)
def test_quorum_counts_round_up(workers: int, quorum: float, need: int) -> None:
    assert SyncRule(quorum, 1000).need(workers) == need


def test_staleness_rule() -> None:
    assert accepts_staleness(5, 5, 0)
    assert not accepts_staleness(4, 5, 0)
    assert accepts_staleness(3, 5, 2)


def test_gradient_sum_mixes_dense_half_and_sparse_contributions() -> None:
    rng = np.random.default_rng(0)
    grads = [rng.normal(size=100).astype(np.float32) for _ in range(3)]
    total = GradientSum(100)
    total.add(DenseGradient(grads[0]))
    half = Fp16Codec()
    total.add(half.decode(half.encode(grads[1]), 100))
    topk = TopKCodec(1.0)
    total.add(topk.decode(topk.encode(grads[2]), 100))
    np.testing.assert_allclose(total.materialize(1.0), sum(grads), rtol=1e-3, atol=1e-3)


def test_gradient_sum_of_one_gradient_reads_it_without_copying() -> None:
    g = np.arange(10, dtype=np.float32)
    total = GradientSum(10)
    total.add(DenseGradient(g))
    target = np.zeros(10, dtype=np.float32)
    total.add_to(target, -1.0)
    np.testing.assert_array_equal(target, -g)


# A shard restarted from a checkpoint older than the process now holding a rank: that rank can
# push from a later version on only (``defer``), so the shard goes on without it until then.


def test_a_deferred_worker_is_not_waited_for_before_its_version() -> None:
    core = _core(workers=2)
    assert core.defer(1, 2, now_ms=0)
    core.offer(_grad(0, 0), now_ms=1)
    core.offer(_grad(0, 1), now_ms=2)
    assert core.version == 2
    np.testing.assert_array_equal(core.theta, np.full(SIZE, -2.0))  # worker 0's alone, twice


def test_a_deferred_worker_is_waited_for_again_from_its_version() -> None:
    core = _core(workers=2)
    core.defer(1, 1, now_ms=0)
    core.offer(_grad(0, 0), now_ms=1)
    assert core.offer(_grad(0, 1), now_ms=2) is Verdict.ACCEPTED
    assert core.version == 1
    core.offer(_grad(1, 1, value=3.0), now_ms=3)
    assert core.version == 2


def test_a_deferred_workers_replayed_push_counts_when_its_version_comes_up() -> None:
    core = _core(workers=2)
    core.defer(1, 1, now_ms=0)
    assert core.offer(_grad(1, 1, value=3.0), now_ms=1) is Verdict.EARLY
    core.offer(_grad(0, 0), now_ms=2)
    core.offer(_grad(0, 1), now_ms=3)
    assert core.version == 2
    np.testing.assert_array_equal(core.theta, np.full(SIZE, -3.0))  # -1, then -(1 + 3) / 2


def test_with_every_rank_deferred_the_versions_before_the_nearest_close_empty() -> None:
    core = _core(workers=2)
    core.defer(0, 3, now_ms=0)
    core.defer(1, 2, now_ms=0)
    assert core.version == 2
    np.testing.assert_array_equal(core.theta, np.zeros(SIZE))
    core.offer(_grad(1, 2), now_ms=1)
    assert core.version == 3


def test_a_worker_that_can_push_the_open_version_is_not_deferred() -> None:
    core = _core(workers=2)
    core.remove(1, now_ms=0)
    assert not core.defer(1, 0, now_ms=0)
    assert core.add(1)
    core.offer(_grad(0, 0), now_ms=1)
    assert core.version == 0


def test_a_deferred_worker_is_a_member_only_from_its_version_whoever_adds_it() -> None:
    core = _core(workers=2)
    core.defer(1, 2, now_ms=0)
    assert not core.add(1)  # the coordinator's assignment still lists the rank
    core.offer(_grad(0, 0), now_ms=1)
    assert core.version == 1


def test_a_removed_deferred_worker_is_not_waited_for_at_its_version() -> None:
    core = _core(workers=2)
    core.defer(1, 1, now_ms=0)
    core.remove(1, now_ms=0)
    core.offer(_grad(0, 0), now_ms=1)
    core.offer(_grad(0, 1), now_ms=2)
    assert core.version == 2


def test_async_defers_nobody() -> None:
    assert not _core(workers=2, mode="async", staleness=1).defer(1, 2, now_ms=0)
