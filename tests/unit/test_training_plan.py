"""Job validation and planning: every error names the field and what is accepted."""

from __future__ import annotations

import hashlib
import io
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from maas import zoo
from maas.datasets import FetchedBytes
from maas.errors import FailedPrecondition, InvalidArgument, NotFound
from maas.training.plan import JobPlan
from maas.training.prepare import BaseModel, Limits, load_dataset, prepare_job
from maas.training.replica import compute_loss

LIMITS = Limits(max_workers=4, max_shards=2, default_deadline_ms=5000)
TINY_GPT = {"vocab_size": 257, "block_size": 128, "n_layer": 1, "n_head": 1, "n_embd": 8}


def _job(**changes: Any) -> dict[str, Any]:
    job: dict[str, Any] = {
        "job_id": "job-1",
        "type": "train",
        "model": {"name": "digits-mlp", "arch": "mlp", "config": {"hidden": [16]}},
        "dataset": {"uri": "builtin:digits"},
        "training": {"steps": 5, "workers": 2, "shards": 2},
    }
    job.update(changes)
    return job


def _training(**changes: Any) -> dict[str, Any]:
    return _job(training={"steps": 5, **changes})


def test_a_valid_job_gets_a_complete_plan_with_defaults() -> None:
    plan = prepare_job(_job(), limits=LIMITS).plan
    assert plan.total_steps == 5 and plan.workers == 2 and plan.shards == 2
    assert plan.loss == "cross_entropy" and plan.training.mode == "sync"
    assert plan.training.step_deadline_ms == 5000
    assert plan.register_name == "digits-mlp"
    assert sum(p.size for p in plan.partitions) == plan.layout.size


def test_a_local_sgd_plan_counts_one_version_per_round() -> None:
    plan = prepare_job(_training(steps=10, mode="local_sgd", sync_every=4), limits=LIMITS).plan
    assert plan.training.sync_every == 4 and plan.target_version == 3


def test_the_plan_survives_json() -> None:
    plan = prepare_job(_job(), limits=LIMITS).plan
    assert JobPlan.from_json(plan.to_json()) == plan


def test_epochs_become_steps_per_worker() -> None:
    plan = prepare_job(_training(steps=None, epochs=2, batch_size=32, workers=2), limits=LIMITS)
    # digits has 1438 training rows: 719 per worker, 2 epochs of 32-row batches.
    assert plan.plan.total_steps == 45


@pytest.mark.parametrize(
    ("job", "message"),
    [
        (_job(model={"arch": "transformer"}), r"model: unknown arch 'transformer'"),
        (_job(model={"config": {}}), r"model\.arch is required"),
        (_training(optimizer={"lr": -0.1}), r"training\.optimizer\.lr=-0\.1"),
        (_training(optimizer={"lr": "fast"}), r"training\.optimizer\.lr='fast'"),
        (_training(workers=9), r"training\.workers=9 is more than a job may use \(4\)"),
        (_training(shards=3), r"training\.shards=3 is more than a job may use \(2\)"),
        (
            _training(workers=2, min_workers=3),
            r"training\.min_workers=3 must be at most training\.workers=2",
        ),
        (_training(mode="eventual"), r"training\.mode='eventual'"),
        (_training(sync_every=4), r"training\.sync_every applies to mode 'local_sgd' only"),
        (_training(mode="local_sgd", sync_every=0), r"training\.sync_every=0 must be"),
        (
            _job(
                model={"arch": "mlp", "config": {"in_features": 16, "num_classes": 1}},
                dataset={"uri": "builtin:regression"},
                training={"loss": "cross_entropy"},
            ),
            r"training\.loss='cross_entropy' does not fit a regression",
        ),
        (_training(steps=10, epochs=1), r"training\.steps and training\.epochs"),
        (_training(gradient_codec="zip"), r"training\.gradient_codec='zip'"),
        (_training(freeze=["nope."]), r"training\.freeze prefix 'nope\.'"),
        (_training(freeze=["body.", "head."]), r"freezes every parameter"),
        (_training(quorum=0), r"training\.quorum=0"),
        (_job(dataset={"uri": "builtin:imagenet"}), r"unknown builtin dataset 'imagenet'"),
        (_job(model={"arch": "mlp", "config": {"in_features": 10}}), r"takes 10 input features"),
        (
            _job(model={"arch": "mlp", "config": {"num_classes": 3}}),
            r"model\.config\.num_classes=3 gives the model 3 classes but builtin:digits's labels "
            r"need 10",
        ),
        (
            _job(model={"arch": "gpt", "config": {**TINY_GPT, "block_size": 64}}),
            r"arch 'gpt' predicts a class at each of \(64,\) positions but builtin:digits has "
            r"one label a row",
        ),
        (
            _job(
                model={"arch": "mlp", "config": {"in_features": 128, "num_classes": 300}},
                dataset={"uri": "builtin:python-stdlib"},
            ),
            r"arch 'mlp' predicts one class a row but builtin:python-stdlib has \(128,\) labels",
        ),
        (
            _job(
                model={"arch": "gpt", "config": {**TINY_GPT, "vocab_size": 100}},
                dataset={"uri": "builtin:python-stdlib"},
            ),
            r"model\.config\.vocab_size=100 gives the model 100 classes but .* need 257",
        ),
        (_job(type="finetune"), r"base is required"),
        (_job(type="compress"), r"type='compress' is not a training job"),
    ],
)
def test_invalid_jobs_are_refused_naming_the_field(job: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        prepare_job(job, limits=LIMITS)


def test_mse_on_a_classification_dataset_regresses_one_hot_targets() -> None:
    assert prepare_job(_training(loss="mse"), limits=LIMITS).plan.loss == "mse"
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    one_hot = torch.tensor([[0.0, 0.0, 1.0]])
    assert compute_loss("mse", logits, torch.tensor([2])) == F.mse_loss(logits, one_hot)


def test_a_job_without_a_dataset_says_what_to_give() -> None:
    job = _job()
    del job["dataset"]
    with pytest.raises(InvalidArgument, match=r"dataset is required"):
        prepare_job(job, limits=LIMITS)


def _base(num_classes: int) -> BaseModel:
    config = {"hidden": [16], "num_classes": num_classes}
    return BaseModel(zoo.build("mlp", config, seed=3), "mlp", config, "digits-base", 4)


def test_finetune_keeps_the_body_and_replaces_a_head_of_another_size() -> None:
    base = _base(10)
    job = _job(
        type="finetune",
        base={"name": "digits-base", "alias": "production"},
        dataset={"uri": "builtin:digits-5-9"},
        training={"steps": 3, "freeze": ["body."]},
    )
    prepared = prepare_job(job, limits=LIMITS, load_base=lambda _: base)
    assert prepared.plan.config["num_classes"] == 5
    assert prepared.state["head.weight"].shape == (5, 16)
    assert torch.equal(prepared.state["body.0.weight"], base.module.state_dict()["body.0.weight"])
    assert prepared.plan.layout.names == ["head.weight", "head.bias"]
    assert prepared.plan.parent == {"name": "digits-base", "version": 4}
    assert prepared.plan.register_name == "digits-mlp"


def test_finetune_refuses_to_freeze_a_head_it_starts_anew() -> None:
    job = _job(
        type="finetune",
        base={"name": "digits-base"},
        dataset={"uri": "builtin:digits-5-9"},
        training={"steps": 3, "freeze": ["head."]},
    )
    with pytest.raises(InvalidArgument, match=r"freezes the head, which this finetune starts"):
        prepare_job(job, limits=LIMITS, load_base=lambda _: _base(10))


def test_finetune_keeps_a_head_that_already_fits() -> None:
    base = _base(5)
    job = _job(type="finetune", base={"name": "digits-base"}, dataset={"uri": "builtin:digits-0-4"})
    prepared = prepare_job(job, limits=LIMITS, load_base=lambda _: base)
    assert torch.equal(prepared.state["head.weight"], base.module.state_dict()["head.weight"])


def test_finetune_of_a_gpt_keeps_its_vocabulary_and_tied_head() -> None:
    module = zoo.build("gpt", TINY_GPT, seed=3)
    base = BaseModel(module, "gpt", dict(TINY_GPT), "pygpt", 2)
    job = _job(
        type="finetune",
        base={"name": "pygpt"},
        model={"name": "pygpt-tuned"},
        dataset={"uri": "builtin:python-stdlib"},
    )
    prepared = prepare_job(job, limits=LIMITS, load_base=lambda _: base)
    assert prepared.plan.config == TINY_GPT
    assert all(torch.equal(prepared.state[k], v) for k, v in module.state_dict().items())


@pytest.mark.parametrize(
    ("model", "refused"),
    [
        ({"name": "m", "arch": "cnn"}, r"model.arch='cnn': a finetune trains its base's arch"),
        (
            {"name": "m", "arch": "mlp", "config": {"hidden": [64, 64]}},
            r"model.config.hidden=\[64, 64\]: a finetune keeps its base's architecture",
        ),
        (
            {"name": "m", "config": {"num_classes": 3}},
            r"model.config.num_classes=3: the head is sized to the dataset's classes "
            r"\(num_classes=5 here",
        ),
    ],
)
def test_finetune_refuses_a_model_section_that_is_not_what_it_trains(model, refused) -> None:
    job = _job(
        type="finetune",
        base={"name": "digits-base"},
        model=model,
        dataset={"uri": "builtin:digits-5-9"},
    )
    with pytest.raises(InvalidArgument, match=refused):
        prepare_job(job, limits=LIMITS, load_base=lambda _: _base(10))


def test_finetune_of_a_missing_base_reports_what_the_registry_said() -> None:
    def missing(_: Any) -> BaseModel:
        raise NotFound("model 'ghost' has no alias 'production'")

    job = _job(type="finetune", base={"name": "ghost", "alias": "production"})
    with pytest.raises(NotFound, match="ghost"):
        prepare_job(job, limits=LIMITS, load_base=missing)


MLP_STEP_BYTES = 4 * (64 * 16 + 16 + 16 * 10 + 10)  # the _job MLP's fp32 gradient a step


def test_a_default_checkpoint_interval_comes_down_until_the_replay_backlog_fits() -> None:
    limits = Limits(default_deadline_ms=5000, max_kept_bytes=21 * MLP_STEP_BYTES)
    plan = prepare_job(_training(steps=100), limits=limits).plan
    assert plan.training.checkpoint_every == 10  # 2 x 10 + 1 steps kept


def test_a_checkpoint_interval_that_fits_is_kept() -> None:
    plan = prepare_job(_training(checkpoint_every=7), limits=LIMITS).plan
    assert plan.training.checkpoint_every == 7


def test_a_given_interval_whose_backlog_does_not_fit_is_refused_saying_what_fits() -> None:
    limits = Limits(default_deadline_ms=5000, max_kept_bytes=21 * MLP_STEP_BYTES)
    with pytest.raises(InvalidArgument, match=r"checkpoint_every=11 .* at most 10 fits"):
        prepare_job(_training(steps=100, checkpoint_every=11), limits=limits)


def test_a_compressing_codec_leaves_room_for_a_longer_interval() -> None:
    limits = Limits(default_deadline_ms=5000, max_kept_bytes=21 * MLP_STEP_BYTES)
    plan = prepare_job(_training(steps=100, gradient_codec="int8"), limits=limits).plan
    assert plan.training.checkpoint_every == 41  # a quarter of the bytes: 2 x 41 + 1 <= 84 steps


def test_an_interval_longer_than_the_job_is_judged_as_checkpointing_at_its_end() -> None:
    # 5 steps keep at most 2 x 5 + 1 pushes, whatever interval the job gave.
    limits = Limits(default_deadline_ms=5000, max_kept_bytes=21 * MLP_STEP_BYTES)
    plan = prepare_job(_training(steps=5, checkpoint_every=1_000_000), limits=limits).plan
    assert plan.training.checkpoint_every == 1_000_000


def test_a_job_whose_version_the_registry_could_not_take_is_refused_before_it_trains() -> None:
    deep = _job(model={"name": "deep", "arch": "mlp", "config": {"hidden": [1] * 6000}})
    with pytest.raises(InvalidArgument, match=r"12,002 tensors.*MAAS_REGISTRY_MAX_MANIFEST_BYTES"):
        prepare_job(deep, limits=LIMITS)


def test_a_freeze_list_too_long_for_the_manifest_is_refused_naming_it() -> None:
    limits = Limits(default_deadline_ms=5000, max_manifest_bytes=64 * 1024)
    with pytest.raises(InvalidArgument, match="training.freeze of 10,000 entries"):
        prepare_job(_training(freeze=["body.0."] * 10_000), limits=limits)


def test_an_ordinary_job_fits_the_manifest_limit_with_room_to_spare() -> None:
    limits = Limits(default_deadline_ms=5000, max_manifest_bytes=16 * 1024)
    assert prepare_job(_job(), limits=limits).plan.register_name == "digits-mlp"


def test_an_async_staleness_too_large_to_keep_is_refused_naming_staleness() -> None:
    limits = Limits(default_deadline_ms=5000, max_kept_bytes=21 * MLP_STEP_BYTES)
    with pytest.raises(InvalidArgument, match=r"lower training.staleness \(it is 30\)"):
        prepare_job(_training(mode="async", staleness=30), limits=limits)


def test_gradients_too_large_to_keep_even_one_interval_are_refused_naming_the_way_out() -> None:
    limits = Limits(default_deadline_ms=5000, max_kept_bytes=2 * MLP_STEP_BYTES)
    with pytest.raises(InvalidArgument, match="compressing training.gradient_codec"):
        prepare_job(_training(), limits=limits)


@pytest.mark.parametrize(
    ("training", "named"),
    [
        ({"epochs": float("inf"), "steps": None}, "training.epochs=inf"),
        ({"steps": 10**30}, "training.steps=.* from 1 to 100000000"),
        ({"seed": 2**64}, r"training.seed=.* \[0, 2\*\*63\)"),
        ({"batch_size": 150_000_000}, "training.batch_size=150000000 must be an integer"),
        ({"batch_size": 5000}, "training.batch_size=5000 is more than the"),
        ({"epochs": 10**8, "steps": None}, "makes .* steps; at most"),
    ],
    ids=["epochs-inf", "steps-1e30", "seed-2**64", "batch-huge", "batch-over-rows", "epochs-many"],
)
def test_training_values_no_worker_could_honour_are_refused_naming_the_field(
    training: dict[str, Any], named: str
) -> None:
    fields = {k: v for k, v in {"steps": 5, **training}.items() if v is not None}
    with pytest.raises(InvalidArgument, match=named):
        prepare_job(_job(training=fields), limits=LIMITS)


@pytest.mark.parametrize("dropout", [1.5, float("nan")])
def test_a_dropout_that_is_not_a_probability_is_refused(dropout: float) -> None:
    model = {"name": "m", "arch": "mlp", "config": {"hidden": [16], "dropout": dropout}}
    with pytest.raises(InvalidArgument, match="model.config.dropout"):
        prepare_job(_job(model=model), limits=LIMITS)


def _npz(rows: int, seed: int) -> bytes:
    buffer = io.BytesIO()
    x = np.random.default_rng(seed).standard_normal((rows, 64), dtype=np.float32)
    np.savez(buffer, X=x, y=np.arange(rows) % 10)
    return buffer.getvalue()


def _fetched(data: bytes) -> FetchedBytes:
    return FetchedBytes(data, hashlib.sha256(data).hexdigest())


def test_an_s3_dataset_is_pinned_by_its_sha256_at_intake_and_checked_at_every_load() -> None:
    accepted, changed = _fetched(_npz(200, seed=1)), _fetched(_npz(200, seed=2))
    job = _job(dataset={"uri": "s3://maas-datasets/d.npz"})
    plan = prepare_job(job, limits=LIMITS, fetch_dataset=lambda _: accepted).plan
    assert plan.dataset["sha256"] == accepted.sha256
    assert JobPlan.from_json(plan.to_json()).dataset == plan.dataset
    assert len(load_dataset(plan.dataset, seed=0, fetch=lambda _: accepted).x_train) == 160
    with pytest.raises(FailedPrecondition, match=r"d\.npz changed since this job was accepted"):
        load_dataset(plan.dataset, seed=0, fetch=lambda _: changed)


def test_a_plan_written_before_datasets_were_pinned_still_loads() -> None:
    plan = prepare_job(_job(), limits=LIMITS).plan
    written = plan.to_json()
    del written["dataset_sha256"]
    assert JobPlan.from_json(written) == plan and "sha256" not in plan.dataset


TINY_BERT = {
    "vocab_size": 100,
    "hidden": 8,
    "layers": 1,
    "heads": 2,
    "intermediate": 16,
    "max_positions": 16,
    "max_seq_length": 16,
    "num_classes": 3,
}


def _token_rows(x: np.ndarray) -> FetchedBytes:
    buffer = io.BytesIO()
    np.savez(buffer, X=x, y=np.arange(len(x)) % 3)
    return _fetched(buffer.getvalue())


@pytest.mark.parametrize(
    ("x", "complaint"),
    [
        (np.full((200, 16), 100), r"X holds values from 100 to 100:"),
        (np.full((200, 16), 0.5), r"X holds values from 0\.5 to 0\.5, some not whole"),
    ],
    ids=["past-the-vocabulary", "fractions"],
)
def test_a_text_model_refuses_features_that_are_not_its_token_ids(x, complaint) -> None:
    job = _job(model={"arch": "bert", "config": TINY_BERT}, dataset={"uri": "s3://b/ids.npz"})
    with pytest.raises(InvalidArgument, match=rf"'bert' reads X as token ids, .* {complaint}"):
        prepare_job(job, limits=LIMITS, fetch_dataset=lambda _: _token_rows(x))


def test_a_text_model_takes_token_ids_within_its_vocabulary() -> None:
    x = np.random.default_rng(0).integers(0, 100, (200, 16))
    job = _job(model={"arch": "bert", "config": TINY_BERT}, dataset={"uri": "s3://b/ids.npz"})
    assert prepare_job(job, limits=LIMITS, fetch_dataset=lambda _: _token_rows(x)).plan
