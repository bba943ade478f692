"""Turn a validated ``train``/``finetune`` job event into a plan and initial weights (torch).

What the JSON Schema cannot check is checked here, each error naming the field: the arch exists,
the model fits the data (input features, classes), a finetune names a base that loads, freeze
prefixes match. For ``finetune`` the base's weights are the starting point; when the new data has
a different class count the ``head`` is rebuilt (seeded) and everything else is kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from maas import artifacts, datasets, zoo
from maas.config import Settings
from maas.errors import FailedPrecondition, InvalidArgument
from maas.manifest import WEIGHTS_FILE, Manifest
from maas.training.codecs import parse_codec
from maas.training.plan import (
    DEFAULT_MAX_KEPT_BYTES,
    MAX_JOB_SHARDS,
    MAX_JOB_WORKERS,
    JobPlan,
    TrainingSpec,
    fit_checkpoints,
    frozen_names,
    make_plan,
)
from maas.training.replica import trainable_shapes

HEAD_PREFIX = "head."
TRAINING_TYPES: tuple[str, ...] = ("train", "finetune")


@dataclass(frozen=True)
class BaseModel:
    """A registry version to start from."""

    module: nn.Module
    arch: str
    config: dict[str, Any]
    name: str
    version: int


@dataclass(frozen=True)
class Limits:
    default_deadline_ms: int
    max_workers: int = MAX_JOB_WORKERS
    max_shards: int = MAX_JOB_SHARDS
    max_kept_bytes: int = DEFAULT_MAX_KEPT_BYTES  # gradients a worker keeps for a replay
    # The registry's limit on the manifest the job's version will have (its tensors, training
    # section and lineage): judged before the job trains, not when its result is registered.
    max_manifest_bytes: int = Settings.registry_max_manifest_bytes

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        """The limits a coordinator with ``settings`` judges jobs by."""
        return cls(
            default_deadline_ms=settings.step_deadline_ms,
            max_kept_bytes=settings.worker_max_kept_bytes,
            max_manifest_bytes=settings.registry_max_manifest_bytes,
        )


@dataclass(frozen=True)
class PreparedJob:
    plan: JobPlan
    state: dict[str, torch.Tensor]  # every tensor of the starting model, frozen ones included
    dataset: datasets.Dataset


FetchDataset = Callable[[str], datasets.FetchedBytes]  # s3://bucket/key.npz -> its bytes
LoadBase = Callable[[Mapping[str, Any]], BaseModel]  # the job's `base` map -> model


def load_dataset(
    spec: Mapping[str, Any], *, seed: int, fetch: FetchDataset | None
) -> datasets.Dataset:
    uri = str(spec.get("uri", ""))
    if uri.startswith("builtin:"):
        data = datasets.load_builtin(uri.removeprefix("builtin:"))
    elif uri.startswith("s3://") and fetch is not None:
        fetched = fetch(uri)
        _check_pinned(uri, spec.get("sha256"), fetched.sha256)
        data = replace(
            datasets.from_npz(uri, fetched.data, task=spec.get("task")), sha256=fetched.sha256
        )
    else:
        raise InvalidArgument(
            f"dataset.uri={uri!r} is not readable; use builtin:<name> or s3://bucket/key.npz"
        )
    task = spec.get("task")
    if task is not None and task != data.task:
        raise InvalidArgument(f"dataset.task={task!r} but {uri} is a {data.task} dataset")
    fraction = spec.get("fraction")
    return data.subset(float(fraction), seed=seed) if fraction is not None else data


def _check_token_ids(data: datasets.Dataset, vocab: int, arch: str) -> None:
    """A text arch reads each feature as a token id: X must hold whole numbers in 0..vocab-1.
    An id past the table failed a worker's step with a bare IndexError; fractions in [0, 1)
    were all read as the pad token, and a model of nothing trained and registered."""
    for split in (data.x_train, data.x_test):
        whole = datasets.every_block(split, lambda rows: not (rows % 1).any())
        if split.size and (split.min() < 0 or split.max() >= vocab or not whole):
            raise InvalidArgument(
                f"dataset {data.name}: arch {arch!r} reads X as token ids, whole numbers from 0 "
                f"to {vocab - 1} (its vocab_size); X holds values from {split.min():g} to "
                f"{split.max():g}{'' if whole else ', some not whole'}: tokenize "
                "the text with the model's tokenizer"
            )


def _check_pinned(uri: str, pinned: object, digest: str) -> None:
    """FailedPrecondition when a job's dataset (``pinned`` by its plan at intake) changed since:
    a worker joining later, or the evaluation at the end, would read other rows."""
    if pinned is not None and pinned != digest:
        raise FailedPrecondition(
            f"{uri} changed since this job was accepted (sha256 {str(pinned)[:12]}... then, "
            f"{digest[:12]}... now): a job trains and is evaluated on the bytes it was accepted "
            "with; upload new data under another key and submit a new job"
        )


def check_fit(arch: str, config: Mapping[str, Any], data: datasets.Dataset, field: str) -> None:
    features = math.prod(zoo.input_shape(arch, dict(config)))
    if features != data.num_features:
        raise InvalidArgument(
            f"{field}: arch {arch!r} takes {features} input features but {data.name} rows have "
            f"{data.num_features}"
        )
    outputs = zoo.output_shape(arch, dict(config))
    if data.task == "classification":
        _check_labels_fit(arch, outputs, data, f"{field}.{_classes_key(config)}")
    elif math.prod(outputs) != (needed := int(data.y_train.shape[1])):
        raise InvalidArgument(
            f"{field}: the model has {math.prod(outputs)} outputs but {data.name} needs {needed}; "
            "set model.config.num_classes accordingly"
        )
    vocab = getattr(zoo.parse_config(arch, dict(config)), "vocab_size", None)
    if vocab is not None:  # checked last: a wrong shape is the likelier mistake, said first
        _check_token_ids(data, int(vocab), arch)


def _check_labels_fit(
    arch: str, outputs: tuple[int, ...], data: datasets.Dataset, field: str
) -> None:
    """A classifier's output is a class per row (C,) or per position (T, C); the labels must be
    one per row (n,) or (n, T) alike, and every class must have an output."""
    positions, labels = outputs[:-1], tuple(data.y_train.shape[1:])
    if positions != labels:
        field = field.rpartition(".")[0]
        predicts = f"a class at each of {positions} positions" if positions else "one class a row"
        has = f"{labels} labels a row" if labels else "one label a row"
        raise InvalidArgument(
            f"{field}: arch {arch!r} predicts {predicts} but {data.name} has {has}; pair a "
            "sequence model with a sequence dataset (e.g. gpt with builtin:python-stdlib) and a "
            "classifier with one label a row"
        )
    if outputs[-1] < data.num_classes:
        raise InvalidArgument(
            f"{field}={outputs[-1]} gives the model {outputs[-1]} classes but {data.name}'s "
            f"labels need {data.num_classes}; set it to {data.num_classes} or more"
        )


def _classes_key(config: Mapping[str, Any]) -> str:
    return "vocab_size" if "vocab_size" in config and "num_classes" not in config else "num_classes"


def _from_base(
    base: BaseModel, data: datasets.Dataset, seed: int
) -> tuple[dict[str, Any], dict[str, torch.Tensor], bool]:
    """The config and starting weights of a finetune of ``base``, and whether its head is new
    (randomly initialised for the dataset's label space)."""
    config = dict(base.config)
    state = {k: v.detach().clone() for k, v in base.module.state_dict().items()}
    # A head of its own for a new label space; an arch without num_classes (gpt: its classes are
    # its vocabulary, its head tied to the embedding) keeps its own, and the checks of the job's
    # shapes say whether the dataset fits it.
    has_head = hasattr(zoo.parse_config(base.arch, config), "num_classes")
    if has_head and data.task == "classification" and config.get("num_classes") != data.num_classes:
        # New task, new label space: keep the features, start a fresh head for it.
        config["num_classes"] = data.num_classes
        fresh = zoo.build(base.arch, config, seed=seed).state_dict()
        # Iterating the fresh model's keys adds a head to a base that had none (an encoder).
        state = {k: (v if k.startswith(HEAD_PREFIX) else state[k]) for k, v in fresh.items()}
        return config, state, True
    return config, state, False


def check_same_architecture(
    model: Mapping[str, Any], arch: str, config: Mapping[str, Any], base: str
) -> None:
    """A finetune's ``model.arch`` and ``model.config``, where given, must be what it trains:
    its base's architecture, the head sized to the dataset's classes (``config``). They were
    dropped without a word: a job asking for a cnn trained and registered its base's mlp."""
    if model.get("arch", arch) != arch:
        raise InvalidArgument(
            f"model.arch={model['arch']!r}: a finetune trains its base's architecture "
            f"({base} is {arch!r}); leave model.arch out, or train a new model (type: train)"
        )
    for key, value in (model.get("config") or {}).items():
        if config.get(key) != value:
            why = (
                "the head is sized to the dataset's classes"
                if key == "num_classes"
                else "a finetune keeps its base's architecture"
            )
            raise InvalidArgument(
                f"model.config.{key}={value!r}: {why} ({key}={config.get(key)!r} here, from "
                f"{base} and the dataset); leave it out"
            )


def prepare_job(
    event: Mapping[str, Any],
    *,
    limits: Limits,
    fetch_dataset: FetchDataset | None = None,
    load_base: LoadBase | None = None,
) -> PreparedJob:
    kind = event.get("type")
    if kind not in TRAINING_TYPES:
        raise InvalidArgument(f"type={kind!r} is not a training job; use one of {TRAINING_TYPES}")
    training = TrainingSpec.from_job(
        event.get("training"),
        max_workers=limits.max_workers,
        max_shards=limits.max_shards,
        default_deadline_ms=limits.default_deadline_ms,
    )
    if "dataset" not in event:
        raise InvalidArgument("dataset is required: {uri: builtin:<name> | s3://bucket/key.npz}")
    data = load_dataset(event["dataset"], seed=training.seed, fetch=fetch_dataset)
    model_spec = event.get("model") or {}
    parent: dict[str, Any] | None = None
    new_head = False
    if kind == "finetune":
        if "base" not in event or load_base is None:
            raise InvalidArgument("base is required for a finetune job: {name, version | alias}")
        base = load_base(event["base"])
        arch = base.arch
        config, state, new_head = _from_base(base, data, training.seed)
        check_same_architecture(model_spec, base.arch, config, f"{base.name}@{base.version}")
        zoo.check_batch_rows(
            arch, config, training.batch_size, f"{base.name}@{base.version}'s config",
            "training.batch_size",
        )  # fmt: skip
        parent = {"name": base.name, "version": base.version}
        field = "base"
    else:
        if "arch" not in model_spec:
            raise InvalidArgument("model.arch is required for a train job, e.g. {arch: mlp}")
        arch = str(model_spec["arch"])
        try:
            config = zoo.config_to_dict(zoo.parse_config(arch, model_spec.get("config")))
        except InvalidArgument as exc:
            raise InvalidArgument(f"model: {exc.message}") from None
        state = dict(zoo.build(arch, config, seed=training.seed).state_dict())
        field = "model.config"
    check_fit(arch, config, data, field)
    model = zoo.build(arch, config)
    frozen = frozen_names([n for n, _ in model.named_parameters()], training.freeze)
    if new_head and any(n.startswith(HEAD_PREFIX) for n in frozen):
        raise InvalidArgument(
            f"training.freeze {list(training.freeze)} freezes the head, which this finetune "
            f"starts anew, at random, for the dataset's {data.num_classes} classes: it would "
            f"never learn them; freeze only the body"
        )
    trainable = trainable_shapes(model, frozen)
    given = event.get("training")
    training = fit_checkpoints(
        training,
        given=isinstance(given, Mapping) and "checkpoint_every" in given,
        step_bytes=parse_codec(training.gradient_codec).wire_bytes(
            sum(math.prod(shape) for _, shape in trainable)
        ),
        budget=limits.max_kept_bytes,
        job_steps=training.total_steps(len(data.x_train)),
    )
    register = event.get("register_as") or {}
    name = (
        register.get("name")
        or model_spec.get("name")
        or (parent["name"] if parent else event["job_id"])
    )
    plan = make_plan(
        job_id=str(event["job_id"]),
        kind=str(kind),
        arch=arch,
        config=config,
        dataset={**event["dataset"], "sha256": data.sha256},
        dataset_task=data.task,
        train_rows=len(data.x_train),
        training=training,
        trainable=trainable,
        register_name=str(name),
        register_alias=register.get("alias"),
        parent=parent,
    )
    _check_manifest_size(plan, state, limits.max_manifest_bytes)
    return PreparedJob(plan, state, data)


# Room for what only the finished job adds to its manifest: its metrics and parent.
MANIFEST_MARGIN_BYTES = 4096


def _check_manifest_size(plan: JobPlan, state: Mapping[str, torch.Tensor], limit: int) -> None:
    """InvalidArgument unless the version this job would register has a manifest the registry
    takes: a model of 20 000 tensors or a training.freeze of a million entries would train to
    the end and then be refused."""
    manifest = Manifest(
        plan.arch,
        plan.config,
        tensors=artifacts.tensor_entries(state),
        files={WEIGHTS_FILE: "0" * 64},
        method=plan.kind,
        settings=plan.lineage_settings,
        job_id=plan.job_id,
    )
    size = len(manifest.to_json()) + MANIFEST_MARGIN_BYTES
    if size > limit:
        raise InvalidArgument(
            f"the version this job would register has a manifest of about {size:,} bytes "
            f"({len(state):,} tensors, training.freeze of {len(plan.training.freeze):,} "
            f"entries); the registry takes at most {limit:,} (MAAS_REGISTRY_MAX_MANIFEST_BYTES): "
            "use fewer layers or freeze patterns"
        )
