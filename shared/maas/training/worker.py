"""One training job from one worker's point of view (no network, no S3: unit-testable, and the
loop ``maas.training.local.simulate`` runs in-process as the reference of the live service).

The worker keeps the newest parameters each shard sent. It may compute when every shard that is
not finished has a version newer than the one it last computed on; it then installs all of them
into its replica, runs forward and backward on its own batch for that step, and hands each
shard's gradient pieces to ``emit`` — per tensor, from inside backward, for codecs that allow it
(``none``, ``fp16``) on models whose gradient is at least ``overlap_min_bytes``, or per partition
once backward is over (smaller models; ``int8``, ``topk``, whose error feedback stays here).

The batch for a sync step is a function of the parameter version, so a restarted worker trains
on exactly the rows the job expects; in async mode the worker counts its own steps. In
``local_sgd`` mode a version is a round: the worker runs ``sync_every`` steps with its own
optimizer (its state stays here) and sends the parameter delta, which the shards average.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping

import numpy as np
import torch

from maas.datasets import Dataset
from maas.errors import FailedPrecondition
from maas.training.broadcast import ShardParams
from maas.training.codecs import ErrorFeedback, parse_codec
from maas.training.plan import JobPlan, kept_steps
from maas.training.protocol import (
    Emit,
    PiecePlan,
    StepInfo,
    overlaps,
    tensor_pushes,
    whole_pushes,
)
from maas.training.replica import BatchResult, Replica, torch_optimizer
from maas.training.sampler import batch_indices


class WorkerJob:
    def __init__(
        self,
        plan: JobPlan,
        worker: int,
        state: Mapping[str, torch.Tensor],
        dataset: Dataset,
        *,
        chunk_bytes: int,
        overlap_min_bytes: int,
    ) -> None:
        self.plan = plan
        self.worker = worker
        self.replica = Replica(plan.arch, plan.config, state, plan.layout, plan.loss)
        self.x, self.y = dataset.shard(worker, plan.workers)
        self.codec = parse_codec(plan.training.gradient_codec)
        self._overlap = overlaps(
            self.codec, plan.training.mode, plan.layout.size, overlap_min_bytes
        )
        self.pieces = [
            PiecePlan.build(plan.layout, p, self.codec, chunk_bytes, per_tensor=self._overlap)
            for p in plan.partitions
        ]
        self._sync = plan.training.mode != "async"
        self._local = (
            torch_optimizer(plan.training.optimizer, self.replica.trainable())
            if plan.training.mode == "local_sgd"
            else None
        )
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
        if self._sync and len({p.version for p in self._latest.values() if not p.final}) > 1:
            return False  # a step computes on one version of every partition (see pushes_from)
        return all(p.final or p.version > self._used.get(s, -1) for s, p in self._latest.items())

    def has(self, shard: int) -> bool:
        """Whether the shard sent this worker its parameters."""
        return shard in self._latest

    def nothing_to_push(self, shard_version: int) -> int:
        """What a worker that can push nothing more says to a shard at ``shard_version``: as
        far ahead as a push may be (the shard refuses more), up to the job's end."""
        training = self.plan.training
        ahead = kept_steps(training.checkpoint_every, training.staleness)
        return min(self.plan.target_version, shard_version + ahead)

    def pushes_from(self, shard: int, shard_version: int, kept: Iterable[int]) -> int | None:
        """The version from which the shard, at ``shard_version``, should wait for this worker,
        if later than its own (None: this worker can push every version from there on).
        ``kept`` are the versions of the pushes its link keeps for the shard."""
        versions = [p.version for p in self._latest.values() if not p.final]
        if not self._sync or not versions or max(versions) <= shard_version:
            return None  # the shard is not behind: every step's case, ``kept`` left unread
        taken = self._used.get(shard)
        # The version taken last counts as kept: its push is on its way (or trimmed by a
        # checkpoint past it, and then behind the shard).
        kept_versions = {*kept, *(() if taken is None else (taken,))}
        return first_pushable(
            shard_version=shard_version, kept=kept_versions, next_version=max(versions)
        )

    def take(self) -> dict[int, ShardParams]:
        """The parameters to compute on next; marks them used so they are taken once."""
        view = dict(self._latest)
        for shard, params in view.items():
            self._used[shard] = params.version
        return view

    def compute(self, view: Mapping[int, ShardParams], emit: Emit) -> BatchResult:
        """Install ``view``, run one step (or one local-SGD round), emit every open shard's
        pieces (CPU heavy: runs on the worker's compute thread)."""
        flat = self.replica.flat_numpy
        for shard, params in view.items():
            self.plan.partitions[shard].scatter(params.values, flat)
        if self._local is not None:
            return self._round(view, emit, self._local)
        step = min(p.version for p in view.values()) if self._sync else self.steps
        loss, batch = self.replica.forward(*self._batch(step))
        self._check_loss(batch.loss, step)
        infos = self._infos(view, batch)
        grad = self.replica.grad_numpy
        if self._overlap:
            pending = set(self.plan.layout.names)

            def tensor_done(name: str) -> None:
                pending.discard(name)
                for shard, info in infos.items():
                    for push in tensor_pushes(self.pieces[shard], name, grad, self.codec, info):
                        emit(shard, push)

            self.replica.backward(loss, tensor_done)
            for name in sorted(pending):  # a tensor the loss does not reach: its zero gradient
                tensor_done(name)
        else:
            self.replica.backward(loss)
            self._emit_whole(grad, infos, emit)
        self.steps += 1
        return batch

    def _round(
        self, view: Mapping[int, ShardParams], emit: Emit, local: torch.optim.Optimizer
    ) -> BatchResult:
        """Local SGD: ``sync_every`` local optimizer steps, then the parameter delta goes out."""
        first = min(p.version for p in view.values()) * self.plan.training.sync_every
        count = min(self.plan.training.sync_every, self.plan.total_steps - first)
        start = self.replica.flat_numpy.copy()
        samples, batch = 0, BatchResult(0.0, None, 0)
        for step in range(first, first + count):
            loss, batch = self.replica.forward(*self._batch(step))
            self._check_loss(batch.loss, step)
            self.replica.backward(loss)
            local.step()  # in place on the replica's flat parameters
            samples += batch.samples
        result = BatchResult(batch.loss, batch.accuracy, samples)
        self._emit_whole(self.replica.flat_numpy - start, self._infos(view, result), emit)
        self.steps += count
        return result

    def _check_loss(self, loss: float, step: int) -> None:
        """A loss that is not a number makes a gradient that is not either: the step fails (and
        with it the job, saying why) before anything is pushed — shards refuse such pushes."""
        if not math.isfinite(loss):
            raise FailedPrecondition(
                f"training diverged: the training loss at step {step} is {loss}; "
                f"{self.plan.training.optimizer.divergence_advice()}"
            )

    def _batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        rows = batch_indices(
            len(self.x),
            self.plan.training.batch_size,
            step,
            seed=self.plan.training.seed,
            worker=self.worker,
        )
        return self.x[rows], self.y[rows]

    def _infos(self, view: Mapping[int, ShardParams], batch: BatchResult) -> dict[int, StepInfo]:
        return {
            shard: StepInfo(params.version, batch.samples, batch.loss, batch.accuracy)
            for shard, params in sorted(view.items())
            if not params.final
        }

    def _emit_whole(self, vector: np.ndarray, infos: Mapping[int, StepInfo], emit: Emit) -> None:
        for shard, info in infos.items():
            plan = self.pieces[shard]
            payload = self._feedback[shard].encode(plan.partition.gather(vector))
            for push in whole_pushes(plan, payload, self.codec, info):
                emit(shard, push)


def first_pushable(*, shard_version: int, kept: Collection[int], next_version: int) -> int | None:
    """The first version from which a worker pushes every one, when a shard at
    ``shard_version`` would otherwise wait for versions it cannot push (None: it can push them
    all). It can push again the versions it kept (``kept``, a gap wherever a step closed
    without it) and compute from ``next_version`` on (the newest version any partition sent
    it: a step computes on one version of every partition, and a partition never sends an
    older one again unless its shard restarts). A shard waits for every version from the one
    declared on, so that is where the kept run reaching ``next_version`` starts."""
    first = next_version
    while first > shard_version and first - 1 in kept:
        first -= 1
    return first if first > shard_version else None
