"""Training in one process, for exactness tests and benches (torch).

- ``train_reference``: plain local training with ``torch.optim`` — the ground truth. Each step
  uses the loss over the workers' batches: the concatenated batch for ``reduce=mean`` and the sum
  of the per-worker mean losses for ``reduce=sum`` (the seed rule's summed gradient).
- ``simulate``: the distributed job without a network: ``W`` real worker loops
  (``maas.training.worker.WorkerJob``: batches, hooks, codecs, error feedback) and one
  ``ShardCore`` per shard, every gradient piece and parameter piece the frame the streams
  carry (``maas.training.v1`` messages), read as the other side reads it, parameters broadcast
  as the shards send them (fp16 for jobs with a compressing codec): the reference of the live
  service.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial

import numpy as np
import torch

from maas import zoo
from maas.config import TRAINING_OVERLAP_MIN_BYTES
from maas.datasets import Dataset
from maas.training.aggregate import ShardCore
from maas.training.broadcast import ParamsAssembler, params_pieces, read_shard_message
from maas.training.plan import JobPlan
from maas.training.protocol import GradientAssembler, OutgoingPush, read_push
from maas.training.replica import compute_loss, torch_optimizer
from maas.training.sampler import batch_indices
from maas.training.worker import WorkerJob


def worker_batch(
    plan: JobPlan, dataset: Dataset, worker: int, step: int
) -> tuple[np.ndarray, np.ndarray]:
    x, y = dataset.shard(worker, plan.workers)
    rows = batch_indices(
        len(x), plan.training.batch_size, step, seed=plan.training.seed, worker=worker
    )
    return x[rows], y[rows]


def train_reference(
    plan: JobPlan, state: Mapping[str, torch.Tensor], dataset: Dataset
) -> dict[str, torch.Tensor]:
    model = zoo.build(plan.arch, plan.config)
    model.load_state_dict(dict(state))
    trainable = set(plan.layout.names)
    params = []
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)
        if name in trainable:
            params.append(param)
    optimizer = torch_optimizer(plan.training.optimizer, params)
    for step in range(plan.total_steps):
        optimizer.zero_grad()
        batches = [worker_batch(plan, dataset, w, step) for w in range(plan.workers)]
        if plan.training.reduce == "mean":
            x = torch.from_numpy(np.concatenate([b[0] for b in batches]))
            y = torch.from_numpy(np.concatenate([b[1] for b in batches]))
            loss = compute_loss(plan.loss, model(x), y)
        else:
            loss = sum(
                (
                    compute_loss(plan.loss, model(torch.from_numpy(x)), torch.from_numpy(y))
                    for x, y in batches
                ),
                start=torch.zeros(()),
            )
        loss.backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def simulate(
    plan: JobPlan,
    state: Mapping[str, torch.Tensor],
    dataset: Dataset,
    *,
    chunk_bytes: int = 4 << 20,
    overlap_min_bytes: int = TRAINING_OVERLAP_MIN_BYTES,
    on_version: Callable[[int, np.ndarray], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Run the job in-process with the services' own worker and shard cores; every worker
    reports every step (full quorum). Workers take turns; a piece reaches its shard as soon as
    it is emitted and a closed version reaches every worker at once, as over the streams.

    ``on_version(version, flat)`` sees the assembled parameters whenever every shard reached a
    new common version (benches evaluate there).
    """
    workers = [
        WorkerJob(
            plan, w, state, dataset, chunk_bytes=chunk_bytes, overlap_min_bytes=overlap_min_bytes
        )
        for w in range(plan.workers)
    ]
    init = workers[0].replica.flat_numpy
    cores = [ShardCore(plan, p.shard, p.gather(init), now_ms=0) for p in plan.partitions]
    gradients = [GradientAssembler(plan.training.gradient_codec, c.partition.size) for c in cores]
    receivers = [[ParamsAssembler(p.size) for p in plan.partitions] for _ in workers]

    def broadcast(core: ShardCore) -> None:
        pieces = params_pieces(
            core.theta,
            version=core.version,
            final=core.done,
            durable_version=core.version,
            dtype=plan.broadcast_dtype,
            chunk_bytes=chunk_bytes,
        )
        for worker, job in enumerate(workers):
            for frame in pieces:
                params = receivers[worker][core.shard].add(read_shard_message(frame))
                if params is not None:
                    job.receive(core.shard, params)

    def deliver(worker: int, shard: int, push: OutgoingPush) -> None:
        contribution = gradients[shard].add(worker, read_push(push.frame))
        core = cores[shard]
        if contribution is not None:
            before = core.version
            core.offer(contribution, now_ms=0)
            if core.version != before:
                broadcast(core)

    def assembled() -> np.ndarray:
        flat = np.empty(plan.layout.size, dtype=np.float32)
        for core in cores:
            core.partition.scatter(core.theta, flat)
        return flat

    for core in cores:
        broadcast(core)
    seen = 0
    while not all(core.done for core in cores):
        ready = [(w, job) for w, job in enumerate(workers) if job.ready()]
        if not ready:
            raise RuntimeError("no worker can compute and the job is not done")
        for worker, job in ready:
            job.compute(job.take(), partial(deliver, worker))
        common = min(core.version for core in cores)
        if on_version is not None and common > seen:
            seen = common
            on_version(common, assembled())
    flat = assembled()
    out = workers[0].replica.state_dict()
    for name, value in plan.layout.unflatten(flat).items():
        out[name] = torch.from_numpy(value.copy())
    return out
