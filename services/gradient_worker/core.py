"""One training job from one worker's point of view (no Kafka, no S3: unit-testable).

The worker keeps the newest parameters each shard published. It may compute when every shard
that is not finished has a version newer than the one it last computed on; it then installs all
of them into its replica, runs forward/backward on its own batch for that step, and encodes each
shard's slice of the gradient with the job's codec (error feedback per shard stays here).

The batch for a sync step is a function of the parameter version, so a restarted worker trains
on exactly the rows the job expects; in async mode the worker counts its own steps.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from maas.datasets import Dataset
from maas.training.codecs import ErrorFeedback, parse_codec
from maas.training.plan import JobPlan
from maas.training.replica import BatchResult, Replica
from maas.training.sampler import batch_indices


@dataclass(frozen=True)
class ShardParams:
    version: int
    values: np.ndarray
    final: bool


@dataclass(frozen=True)
class ShardGradient:
    shard: int
    version: int
    payload: dict[str, Any]


@dataclass(frozen=True)
class StepOutcome:
    step: int
    batch: BatchResult
    gradients: list[ShardGradient]


class WorkerJob:
    def __init__(
        self, plan: JobPlan, worker: int, state: Mapping[str, torch.Tensor], dataset: Dataset
    ) -> None:
        self.plan = plan
        self.worker = worker
        self.replica = Replica(plan.arch, plan.config, state, plan.layout, plan.loss)
        self.x, self.y = dataset.shard(worker, plan.workers)
        self.codec = parse_codec(plan.training.gradient_codec)
        self._feedback = [ErrorFeedback(self.codec) for _ in plan.partitions]
        self._latest: dict[int, ShardParams] = {}
        self._used: dict[int, int] = {}
        self.steps = 0

    def receive(self, shard: int, params: ShardParams) -> bool:
        """Keep ``params`` if newer than what is held; True if kept."""
        held = self._latest.get(shard)
        newer = (
            held is None
            or params.version > held.version
            or (params.final and not held.final and params.version == held.version)
        )
        if newer:
            self._latest[shard] = params
        return newer

    @property
    def finished(self) -> bool:
        return len(self._latest) == self.plan.shards and all(p.final for p in self._latest.values())

    def ready(self) -> bool:
        if len(self._latest) < self.plan.shards or self.finished:
            return False
        return all(p.final or p.version > self._used.get(s, -1) for s, p in self._latest.items())

    def take(self) -> dict[int, ShardParams]:
        """The parameters to compute on next; marks them used so they are taken once."""
        view = dict(self._latest)
        for shard, params in view.items():
            self._used[shard] = params.version
        return view

    def compute(self, view: Mapping[int, ShardParams]) -> StepOutcome:
        """Install ``view``, run one batch, encode each open shard's gradient (CPU heavy)."""
        flat = self.replica.flat_numpy
        for shard, params in view.items():
            self.plan.partitions[shard].scatter(params.values, flat)
        sync = self.plan.training.mode == "sync"
        step = min(p.version for p in view.values()) if sync else self.steps
        rows = batch_indices(
            len(self.x),
            self.plan.training.batch_size,
            step,
            seed=self.plan.training.seed,
            worker=self.worker,
        )
        batch = self.replica.compute(self.x[rows], self.y[rows])
        grad = self.replica.grad_numpy
        gradients = [
            ShardGradient(
                shard,
                params.version,
                self._feedback[shard].encode(self.plan.partitions[shard].gather(grad)),
            )
            for shard, params in sorted(view.items())
            if not params.final
        ]
        self.steps += 1
        return StepOutcome(step, batch, gradients)
