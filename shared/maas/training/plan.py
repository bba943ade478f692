"""A training job, validated and planned: what every worker and shard needs to know, as JSON.

``TrainingSpec.from_job`` checks the ``training`` section of a ``maas.job/1`` event beyond what
the JSON Schema can (cross-field rules, deployment limits) and fills defaults; every error names
the field, the value and what is accepted. ``JobPlan`` adds what needs the model and the data
(trainable layout, partitions, total steps); the coordinator writes it to S3 once and every
worker and shard reads it from there, so all of them act on the same plan.

No torch here: aggregator shards load plans without it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from maas.errors import InvalidArgument
from maas.events import shown
from maas.training.codecs import parse_codec
from maas.training.layout import SPLITS, FlatLayout, ParamPartition, partition
from maas.training.optim import OptimizerSpec

MODES: tuple[str, ...] = ("sync", "async", "local_sgd")
REDUCES: tuple[str, ...] = ("mean", "sum")
BROADCASTS: tuple[str, ...] = ("float32", "float16")
LOSSES: dict[str, str] = {"classification": "cross_entropy", "regression": "mse"}
DEFAULT_STEPS = 100
DEFAULT_BATCH_SIZE = 32
DEFAULT_CHECKPOINT_EVERY = 50
DEFAULT_STALENESS = 2
# The most ranks and partitions one job may ask for (the job schema says the same).
DEFAULT_MAX_KEPT_BYTES = 4 << 30  # MAAS_WORKER_MAX_KEPT_BYTES
MAX_STEPS = 100_000_000  # steps (and other counts) a job may ask for: weeks of training
MAX_JOB_WORKERS = 64
MAX_JOB_SHARDS = 64


def _choice(training: Mapping[str, Any], key: str, allowed: Sequence[str], default: str) -> str:
    value = training.get(key, default)
    if value not in allowed:
        raise InvalidArgument(f"training.{key}={value!r} is unknown; use one of {list(allowed)}")
    return str(value)


def _positive_int(
    training: Mapping[str, Any], key: str, default: int, most: int = MAX_STEPS
) -> int:
    value = training.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
        raise InvalidArgument(f"training.{key}={shown(value)} must be an integer from 1 to {most}")
    return value


@dataclass(frozen=True)
class TrainingSpec:
    """The ``training`` section with defaults filled in; steps may still be given as epochs."""

    steps: int | None = None
    epochs: float | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    loss: str | None = None
    workers: int = 1
    min_workers: int | None = None  # start with this many free workers (default: all of them)
    mode: str = "sync"
    staleness: int = DEFAULT_STALENESS
    quorum: float = 1.0
    shards: int = 1
    split: str = "horizontal"
    reduce: str = "mean"
    gradient_codec: str = "none"
    broadcast: str = "float32"  # dtype shards send parameters in (float16 halves the bytes)
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY
    freeze: tuple[str, ...] = ()
    seed: int = 0
    step_deadline_ms: int = 10_000
    sync_every: int = 1  # local_sgd: local steps per averaging round (H)

    @classmethod
    def from_job(
        cls,
        training: Mapping[str, Any] | None,
        *,
        max_workers: int,
        max_shards: int,
        default_deadline_ms: int,
    ) -> TrainingSpec:
        t = dict(training or {})
        steps, epochs = t.get("steps"), t.get("epochs")
        if steps is not None and epochs is not None:
            raise InvalidArgument("training.steps and training.epochs are exclusive; give one")
        if steps is not None:
            steps = _positive_int(t, "steps", DEFAULT_STEPS)
        if epochs is not None and not (
            isinstance(epochs, int | float)
            and not isinstance(epochs, bool)
            and 0 < epochs <= MAX_STEPS
        ):
            raise InvalidArgument(
                f"training.epochs={shown(epochs)} must be a number above 0, at most {MAX_STEPS}"
            )
        workers = _positive_int(t, "workers", 1)
        if workers > max_workers:
            raise InvalidArgument(
                f"training.workers={workers} is more than a job may use ({max_workers})"
            )
        min_workers = _positive_int(t, "min_workers", workers)
        if min_workers > workers:
            raise InvalidArgument(
                f"training.min_workers={min_workers} must be at most training.workers={workers}"
            )
        shards = _positive_int(t, "shards", 1)
        if shards > max_shards:
            raise InvalidArgument(
                f"training.shards={shards} is more than a job may use ({max_shards})"
            )
        quorum = t.get("quorum", 1.0)
        if not (isinstance(quorum, int | float) and 0 < quorum <= 1):
            raise InvalidArgument(f"training.quorum={quorum!r} must be in (0, 1]")
        staleness = t.get("staleness", DEFAULT_STALENESS)
        if isinstance(staleness, bool) or not isinstance(staleness, int) or staleness < 0:
            raise InvalidArgument(f"training.staleness={staleness!r} must be an integer >= 0")
        codec = str(t.get("gradient_codec", "none"))
        parse_codec(codec)
        freeze = t.get("freeze", [])
        if not isinstance(freeze, list) or not all(isinstance(p, str) and p for p in freeze):
            raise InvalidArgument(
                f"training.freeze={shown(freeze)} must be a list of non-empty parameter-name "
                "prefixes, e.g. ['embeddings.', 'encoder.layer.0.']"
            )
        mode = _choice(t, "mode", MODES, "sync")
        if "sync_every" in t and mode != "local_sgd":
            raise InvalidArgument(
                f"training.sync_every applies to mode 'local_sgd' only, not {mode!r}"
            )
        if "quorum" in t and mode == "async":
            raise InvalidArgument(
                "training.quorum applies to modes 'sync' and 'local_sgd', not 'async' (an async "
                "step closes on each push, bounded by training.staleness); leave it out"
            )
        seed = t.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise InvalidArgument(f"training.seed={shown(seed)} must be an integer in [0, 2**63)")
        return cls(
            steps=steps,
            epochs=float(epochs) if epochs is not None else None,
            batch_size=_positive_int(t, "batch_size", DEFAULT_BATCH_SIZE),
            optimizer=_optimizer(t.get("optimizer")),
            loss=_loss(t.get("loss")),
            workers=workers,
            min_workers=min_workers if "min_workers" in t else None,
            mode=mode,
            staleness=staleness,
            quorum=float(quorum),
            shards=shards,
            split=_choice(t, "split", SPLITS, "horizontal"),
            reduce=_choice(t, "reduce", REDUCES, "mean"),
            gradient_codec=codec,
            broadcast=_choice(t, "broadcast", BROADCASTS, "float32"),
            checkpoint_every=_positive_int(t, "checkpoint_every", DEFAULT_CHECKPOINT_EVERY),
            freeze=tuple(freeze),
            seed=seed,
            step_deadline_ms=_positive_int(t, "step_deadline_ms", default_deadline_ms),
            sync_every=_positive_int(t, "sync_every", 1),
        )

    def total_steps(self, train_rows: int) -> int:
        """Steps per worker: given, or enough for ``epochs`` passes over each worker's shard."""
        if self.steps is not None:
            return self.steps
        if self.epochs is None:
            return DEFAULT_STEPS
        rows_per_worker = max(1, train_rows // self.workers)
        return max(1, math.ceil(self.epochs * rows_per_worker / self.batch_size))

    def loss_for(self, task: str) -> str:
        """The job's loss, or the task's default; mse on classes regresses one-hot targets."""
        expected = LOSSES[task]
        if self.loss is None or self.loss == expected:
            return expected
        if task == "classification" and self.loss == "mse":
            return "mse"
        raise InvalidArgument(
            f"training.loss={self.loss!r} does not fit a {task} dataset; use {expected!r}"
        )

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["optimizer"] = self.optimizer.to_json()
        out["freeze"] = list(self.freeze)
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> TrainingSpec:
        values = dict(obj)
        values["optimizer"] = OptimizerSpec.from_json(values["optimizer"])
        values["freeze"] = tuple(values.get("freeze", ()))
        return cls(**values)


def _loss(value: Any) -> str | None:
    if value is not None and value not in LOSSES.values():
        raise InvalidArgument(
            f"training.loss={value!r} is unknown; use one of {sorted(LOSSES.values())}"
        )
    return value


def _optimizer(raw: Any) -> OptimizerSpec:
    if raw is None:
        return OptimizerSpec()
    if not isinstance(raw, Mapping):
        raise InvalidArgument("training.optimizer must be a map {name, lr, momentum, weight_decay}")
    known = {"name", "lr", "momentum", "weight_decay", "beta1", "beta2", "eps"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise InvalidArgument(
            f"training.optimizer has unknown keys {unknown}; known {sorted(known)}"
        )
    for key, value in raw.items():
        if key != "name" and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise InvalidArgument(f"training.optimizer.{key}={value!r} must be a number")
    numbers = {k: float(v) for k, v in raw.items() if k != "name"}
    return OptimizerSpec(name=str(raw.get("name", "sgd")), **numbers)


# A shard sends no version more than this many checkpoint intervals past its newest durable
# checkpoint (services.aggregator.shard_job.held_back), and workers keep every push since that
# checkpoint to replay it to a restarted shard: this bounds what they keep.
HOLD_INTERVALS = 2


def kept_steps(checkpoint_every: int, ahead: int) -> int:
    """The most steps of pushes a worker keeps for a replay (``ahead``: how many versions an
    async worker may run past the shard's newest)."""
    return HOLD_INTERVALS * checkpoint_every + 1 + ahead


def fit_checkpoints(
    spec: TrainingSpec, *, given: bool, step_bytes: int, budget: int, job_steps: int
) -> TrainingSpec:
    """``spec`` with a ``checkpoint_every`` whose replay backlog (``kept_steps`` pushes of
    ``step_bytes``) fits ``budget``: the default comes down to fit; a value the job gave that
    does not fit is refused, saying what does. An interval longer than the job's ``job_steps``
    checkpoints only at its end, and is judged as that."""
    ahead = spec.staleness if spec.mode == "async" else 0
    if kept_steps(min(spec.checkpoint_every, job_steps), ahead) * step_bytes <= budget:
        return spec
    fits = (budget // max(1, step_bytes) - 1 - ahead) // HOLD_INTERVALS
    setting = f"MAAS_WORKER_MAX_KEPT_BYTES={budget}"
    if fits < 1:
        lower = f"lower training.staleness (it is {ahead}), " if ahead else ""
        raise InvalidArgument(
            f"each step's gradients take {step_bytes} bytes (codec {spec.gradient_codec}); a "
            f"worker keeps {kept_steps(1, ahead)} steps of them for a replay even with "
            f"training.checkpoint_every=1"
            f"{f' (3 + staleness {ahead} in async mode)' if ahead else ''}, over {setting}; "
            f"{lower}use a compressing training.gradient_codec (fp16, int8, topk) or freeze "
            "layers"
        )
    if given:
        kept = kept_steps(spec.checkpoint_every, ahead) * step_bytes
        raise InvalidArgument(
            f"training.checkpoint_every={spec.checkpoint_every} lets a worker keep up to {kept} "
            f"bytes of gradients for a replay ({HOLD_INTERVALS} x checkpoint_every + 1 steps of "
            f"{step_bytes}, + staleness in async mode); at most {fits} fits {setting}"
        )
    return replace(spec, checkpoint_every=min(spec.checkpoint_every, fits))


def frozen_names(names: Sequence[str], prefixes: Sequence[str]) -> set[str]:
    """Parameter names matched by ``training.freeze``; every prefix must match something."""
    frozen: set[str] = set()
    for prefix in prefixes:
        hits = {n for n in names if n.startswith(prefix)}
        if not hits:
            raise InvalidArgument(
                f"training.freeze prefix {prefix!r} matches no parameter; parameters are "
                f"{list(names)}"
            )
        frozen |= hits
    if frozen == set(names):
        raise InvalidArgument("training.freeze freezes every parameter; nothing would train")
    return frozen


@dataclass(frozen=True)
class JobPlan:
    """Everything a worker or shard needs, fixed when the job is accepted."""

    job_id: str
    kind: str  # train | finetune
    arch: str
    config: dict[str, Any]
    dataset_uri: str
    dataset_task: str
    dataset_fraction: float | None
    training: TrainingSpec
    loss: str
    total_steps: int
    layout: FlatLayout  # trainable parameters only, in named_parameters order
    partitions: tuple[ParamPartition, ...]
    register_name: str
    register_alias: str | None = None
    parent: dict[str, Any] | None = None  # {name, version} of the finetune base
    dataset_sha256: str | None = None  # an S3 dataset's bytes at intake: every load checks them

    @property
    def workers(self) -> int:
        return self.training.workers

    @property
    def shards(self) -> int:
        return len(self.partitions)

    @property
    def broadcast_dtype(self) -> str:
        """How shards send parameters (``training.broadcast``): float32 keeps workers exact,
        float16 halves the bytes; a setting of its own, apart from the gradient codec."""
        return self.training.broadcast

    @property
    def dataset(self) -> dict[str, Any]:
        """The job's ``dataset`` section, for loading exactly the rows the plan was made on."""
        spec: dict[str, Any] = {"uri": self.dataset_uri, "task": self.dataset_task}
        if self.dataset_fraction is not None:
            spec["fraction"] = self.dataset_fraction
        if self.dataset_sha256 is not None:
            spec["sha256"] = self.dataset_sha256
        return spec

    @property
    def lineage_settings(self) -> dict[str, Any]:
        """The manifest's ``settings`` of the version the job registers: its training section,
        and the dataset a later compress job evaluates on."""
        return {**self.training.to_json(), "dataset": self.dataset}

    @property
    def target_version(self) -> int:
        """Parameter versions a shard applies before it is done.

        Sync: one per step. Async: one per accepted gradient, and each worker computes
        ``total_steps`` of them, so the job sees as many samples in both modes. Local SGD: one
        per averaging round of ``sync_every`` local steps.
        """
        if self.training.mode == "async":
            return self.total_steps * self.workers
        if self.training.mode == "local_sgd":
            return math.ceil(self.total_steps / self.training.sync_every)
        return self.total_steps

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["training"] = self.training.to_json()
        out["layout"] = self.layout.to_json()
        out["partitions"] = [p.to_json() for p in self.partitions]
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> JobPlan:
        values = dict(obj)
        values["training"] = TrainingSpec.from_json(values["training"])
        values["layout"] = FlatLayout.from_json(values["layout"])
        values["partitions"] = tuple(ParamPartition.from_json(p) for p in values["partitions"])
        return cls(**values)


def make_plan(
    *,
    job_id: str,
    kind: str,
    arch: str,
    config: Mapping[str, Any],
    dataset: Mapping[str, Any],
    dataset_task: str,
    train_rows: int,
    training: TrainingSpec,
    trainable: Sequence[tuple[str, Sequence[int]]],
    register_name: str,
    register_alias: str | None = None,
    parent: Mapping[str, Any] | None = None,
) -> JobPlan:
    """Fix the layout of the trainable parameters and split it over the job's shards."""
    layout = FlatLayout.from_shapes(trainable)
    if train_rows < training.workers:
        raise InvalidArgument(
            f"dataset {dataset['uri']} has {train_rows} training rows, fewer than "
            f"training.workers={training.workers}"
        )
    rows_per_worker = train_rows // training.workers
    if training.batch_size > rows_per_worker:
        raise InvalidArgument(
            f"training.batch_size={training.batch_size} is more than the {rows_per_worker} "
            f"training rows each of the {training.workers} workers holds; use at most "
            f"{rows_per_worker}"
        )
    if training.total_steps(train_rows) > MAX_STEPS:
        raise InvalidArgument(
            f"training.epochs={training.epochs} makes {training.total_steps(train_rows)} steps; "
            f"at most {MAX_STEPS}"
        )
    return JobPlan(
        job_id=job_id,
        kind=kind,
        arch=arch,
        config=dict(config),
        dataset_uri=str(dataset["uri"]),
        dataset_task=dataset_task,
        dataset_fraction=dataset.get("fraction"),
        training=training,
        loss=training.loss_for(dataset_task),
        total_steps=training.total_steps(train_rows),
        layout=layout,
        partitions=tuple(partition(layout, training.shards, training.split)),
        register_name=register_name,
        register_alias=register_alias,
        parent=dict(parent) if parent else None,
        dataset_sha256=dataset.get("sha256"),
    )
