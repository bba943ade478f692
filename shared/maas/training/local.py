"""Training in one process, for exactness tests and benches (torch).

- ``train_reference``: plain local training with ``torch.optim`` — the ground truth. Each step
  uses the loss over the workers' batches: the concatenated batch for ``reduce=mean`` and the sum
  of the per-worker mean losses for ``reduce=sum`` (the seed rule's summed gradient).
- ``simulate``: the distributed algorithm without Kafka: ``W`` replicas, one ``ShardCore`` per
  shard, every gradient encoded with the job's codec (error feedback on the worker), packed with
  msgpack and decoded again, and parameters broadcast as the shards send them (fp16 for jobs
  with a compressing codec), exactly as the services do it.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial

import msgpack
import numpy as np
import torch

from maas import zoo
from maas.datasets import Dataset
from maas.training.aggregate import Contribution, ShardCore
from maas.training.codecs import ErrorFeedback, parse_codec
from maas.training.plan import JobPlan
from maas.training.protocol import broadcast_values
from maas.training.replica import Replica, compute_loss
from maas.training.sampler import batch_indices


def worker_batch(
    plan: JobPlan, dataset: Dataset, worker: int, step: int
) -> tuple[np.ndarray, np.ndarray]:
    x, y = dataset.shard(worker, plan.workers)
    rows = batch_indices(
        len(x), plan.training.batch_size, step, seed=plan.training.seed, worker=worker
    )
    return x[rows], y[rows]


def _torch_optimizer(plan: JobPlan, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    spec = plan.training.optimizer
    if spec.name == "adam":
        return torch.optim.Adam(
            params,
            lr=spec.lr,
            betas=(spec.beta1, spec.beta2),
            eps=spec.eps,
            weight_decay=spec.weight_decay,
        )
    return torch.optim.SGD(
        params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay
    )


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
    optimizer = _torch_optimizer(plan, params)
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


def _wire(payload: dict[str, object]) -> dict[str, object]:
    """What the aggregator gets after the payload crossed Kafka: msgpack there and back."""
    return msgpack.unpackb(msgpack.packb(payload, use_bin_type=True), raw=False)


def simulate(
    plan: JobPlan, state: Mapping[str, torch.Tensor], dataset: Dataset
) -> dict[str, torch.Tensor]:
    """Run the job's algorithm in-process; every worker reports every step (full quorum).

    In async mode workers take turns, each computing on the newest parameters.
    """
    codec = parse_codec(plan.training.gradient_codec)
    replicas = [
        Replica(plan.arch, plan.config, state, plan.layout, plan.loss) for _ in range(plan.workers)
    ]
    init = replicas[0].flat_numpy
    cores = [ShardCore(plan, p.shard, p.gather(init), now_ms=0) for p in plan.partitions]
    feedback = [[ErrorFeedback(codec) for _ in cores] for _ in replicas]
    steps = [0] * plan.workers
    while not all(core.done for core in cores):
        sent = []
        for worker, replica in enumerate(replicas):
            for core in cores:
                seen = broadcast_values(core.theta, plan.broadcast_dtype)
                core.partition.scatter(seen.astype(np.float32), replica.flat_numpy)
            x, y = worker_batch(plan, dataset, worker, steps[worker])
            result = replica.compute(x, y)
            steps[worker] += 1
            for core in cores:
                payload = _wire(
                    feedback[worker][core.shard].encode(core.partition.gather(replica.grad_numpy))
                )
                contribution = Contribution(
                    worker,
                    core.version,
                    result.samples,
                    decode=partial(codec.decode, payload, core.partition.size),
                )
                if plan.training.mode == "async":
                    core.offer(contribution, now_ms=0)
                else:
                    sent.append((core, contribution))
        for core, contribution in sent:
            core.offer(contribution, now_ms=0)
    flat = np.empty(plan.layout.size, dtype=np.float32)
    for core in cores:
        core.partition.scatter(core.theta, flat)
    out = replicas[0].state_dict()
    for name, value in plan.layout.unflatten(flat).items():
        out[name] = torch.from_numpy(value.copy())
    return out
