"""The distributed algorithm (workers, codecs, shards; no network) against local training.

``simulate`` runs exactly the worker loop and shard core the services run, every gradient and
parameter piece serialized as the data plane's messages; ``train_reference`` is torch.optim on
one model.
"""

from __future__ import annotations

from typing import Any

import torch

from maas import zoo
from maas.config import TRAINING_OVERLAP_MIN_BYTES
from maas.training.local import simulate, train_reference
from maas.training.prepare import Limits, PreparedJob, prepare_job
from maas.training.replica import evaluate

LIMITS = Limits(max_workers=4, max_shards=4, default_deadline_ms=1000)


def _prepare(**training: Any) -> PreparedJob:
    job = {
        "job_id": "exact",
        "type": "train",
        "model": {"arch": "mlp", "config": {"hidden": [32]}},
        "dataset": {"uri": "builtin:digits"},
        "training": {"steps": 15, "batch_size": 16, "optimizer": {"lr": 0.1}, **training},
    }
    return prepare_job(job, limits=LIMITS)


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=name)


def _assert_simulation_is_the_reference(job: PreparedJob, atol: float = 1e-6) -> None:
    """The simulated distributed run ends with the weights of the plain local training, whether
    the workers push tensor by tensor during backward or each partition whole after it."""
    reference = train_reference(job.plan, job.state, job.dataset)
    for overlap_min_bytes in (0, TRAINING_OVERLAP_MIN_BYTES):
        simulated = simulate(job.plan, job.state, job.dataset, overlap_min_bytes=overlap_min_bytes)
        _assert_same(simulated, reference, atol=atol)


def test_one_worker_one_shard_sync_sum_equals_local_sgd() -> None:
    job = _prepare(workers=1, shards=1, reduce="sum")
    _assert_simulation_is_the_reference(job)


def test_two_workers_mean_equals_local_sgd_on_the_concatenated_batch() -> None:
    job = _prepare(workers=2, shards=2, reduce="mean")
    _assert_simulation_is_the_reference(job)


def test_two_workers_sum_equals_local_sgd_with_the_summed_gradient() -> None:
    job = _prepare(workers=2, shards=1, reduce="sum", optimizer={"lr": 0.05})
    _assert_simulation_is_the_reference(job)


def test_cutting_the_messages_into_small_pieces_changes_no_bit() -> None:
    job = _prepare(workers=2, shards=2, reduce="mean")
    whole = simulate(job.plan, job.state, job.dataset)
    pieces = simulate(job.plan, job.state, job.dataset, chunk_bytes=96)
    _assert_same(whole, pieces, atol=0.0)


def test_pushing_tensor_by_tensor_during_backward_changes_no_bit() -> None:
    job = _prepare(workers=2, shards=2, reduce="mean")
    whole = simulate(job.plan, job.state, job.dataset)  # a small model: partitions whole
    by_tensor = simulate(job.plan, job.state, job.dataset, overlap_min_bytes=0)
    _assert_same(whole, by_tensor, atol=0.0)


def test_horizontal_and_vertical_splits_give_identical_parameters() -> None:
    horizontal = _prepare(workers=2, shards=2, split="horizontal")
    vertical = _prepare(workers=2, shards=2, split="vertical")
    assert horizontal.plan.partitions != vertical.plan.partitions
    h = simulate(horizontal.plan, horizontal.state, horizontal.dataset)
    v = simulate(vertical.plan, vertical.state, vertical.dataset)
    # Element-wise the same arithmetic; only BLAS's vector/tail split may round differently.
    _assert_same(h, v, atol=1e-6)


def test_async_with_staleness_zero_equals_sync() -> None:
    sync = _prepare(workers=1, shards=2, mode="sync")
    async_ = _prepare(workers=1, shards=2, mode="async", staleness=0)
    _assert_same(
        simulate(async_.plan, async_.state, async_.dataset),
        simulate(sync.plan, sync.state, sync.dataset),
        atol=1e-6,
    )


def test_local_sgd_on_one_worker_equals_local_training() -> None:
    job = _prepare(
        workers=1,
        shards=2,
        mode="local_sgd",
        sync_every=4,
        optimizer={"lr": 0.05, "momentum": 0.9},
    )
    assert job.plan.target_version == 4  # 15 steps in rounds of 4: the last one has 3
    _assert_simulation_is_the_reference(job)


def test_local_sgd_averaging_after_every_step_equals_synchronous_sgd() -> None:
    job = _prepare(workers=2, shards=2, mode="local_sgd", sync_every=1)
    _assert_simulation_is_the_reference(job)


def test_local_sgd_rounds_of_several_steps_still_learn() -> None:
    job = _prepare(
        workers=2,
        shards=2,
        mode="local_sgd",
        sync_every=5,
        steps=60,
        batch_size=32,
        optimizer={"lr": 0.3},
    )
    model = zoo.build(job.plan.arch, job.plan.config)
    model.load_state_dict(simulate(job.plan, job.state, job.dataset))
    metrics = evaluate(model, job.dataset.x_test, job.dataset.y_test, "cross_entropy")
    assert metrics["accuracy"] > 0.8


def test_momentum_and_weight_decay_match_torch_sgd() -> None:
    job = _prepare(
        workers=2, shards=2, optimizer={"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}
    )
    _assert_simulation_is_the_reference(job, atol=1e-5)


def test_adam_matches_torch_adam() -> None:
    job = _prepare(workers=2, shards=2, optimizer={"name": "adam", "lr": 0.01})
    _assert_simulation_is_the_reference(job, atol=1e-5)


def test_frozen_parameters_do_not_move() -> None:
    job = _prepare(workers=2, shards=2, freeze=["body."])
    out = simulate(job.plan, job.state, job.dataset)
    assert torch.equal(out["body.0.weight"], job.state["body.0.weight"])
    assert not torch.equal(out["head.weight"], job.state["head.weight"])


def test_compressed_gradients_learn_about_as_well_as_uncompressed() -> None:
    accuracy = {}
    for codec in ("none", "fp16", "int8", "topk(0.05)"):
        job = _prepare(
            workers=2,
            shards=2,
            gradient_codec=codec,
            steps=60,
            batch_size=32,
            optimizer={"lr": 0.3},
        )
        model_state = simulate(job.plan, job.state, job.dataset)
        model = zoo.build(job.plan.arch, job.plan.config)
        model.load_state_dict(model_state)
        accuracy[codec] = evaluate(model, job.dataset.x_test, job.dataset.y_test, "cross_entropy")[
            "accuracy"
        ]
    assert accuracy["none"] > 0.8, accuracy
    assert min(accuracy.values()) > accuracy["none"] - 0.03, accuracy


def test_regression_with_mse_matches_local_training() -> None:
    job = prepare_job(
        {
            "job_id": "reg",
            "type": "train",
            "model": {
                "arch": "mlp",
                "config": {"in_features": 16, "hidden": [8], "num_classes": 1},
            },
            "dataset": {"uri": "builtin:regression"},
            "training": {"steps": 10, "workers": 2, "shards": 2, "optimizer": {"lr": 0.01}},
        },
        limits=LIMITS,
    )
    assert job.plan.loss == "mse"
    _assert_simulation_is_the_reference(job)
