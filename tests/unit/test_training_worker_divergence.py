"""A gradient worker whose training loss stops being a number fails its step before anything
is pushed, saying why: the job fails at once with the reason instead of training on to the end
(shards refuse non-finite pushes, tests/unit/test_training_protocol.py)."""

from __future__ import annotations

import numpy as np
import pytest

from maas.errors import FailedPrecondition
from maas.training.broadcast import ShardParams
from maas.training.optim import OptimizerSpec
from maas.training.prepare import Limits, prepare_job
from maas.training.worker import WorkerJob


def _worker(mode: str) -> WorkerJob:
    training = {"steps": 4, "workers": 1, "shards": 2, "mode": mode, "optimizer": {"lr": 0.5}}
    if mode == "local_sgd":
        training["sync_every"] = 2
    prepared = prepare_job(
        {
            "job_id": "d",
            "type": "train",
            "model": {"arch": "mlp", "config": {"hidden": [8]}},
            "dataset": {"uri": "builtin:digits"},
            "training": training,
        },
        limits=Limits(1000, max_workers=1, max_shards=2),
    )
    return WorkerJob(
        prepared.plan, 0, prepared.state, prepared.dataset, chunk_bytes=1 << 20,
        overlap_min_bytes=0,
    )  # fmt: skip


@pytest.mark.parametrize("mode", ["sync", "local_sgd"])
def test_a_loss_that_is_not_a_number_fails_the_step_and_pushes_nothing(mode: str) -> None:
    job = _worker(mode)
    for shard in range(2):
        size = job.plan.partitions[shard].size
        job.receive(shard, ShardParams(0, np.full(size, np.nan, dtype=np.float32), False))
    pushed: list[int] = []
    said = r"training diverged: the training loss at step 0 is nan; lower training.optimizer.lr"
    with pytest.raises(FailedPrecondition, match=said + r" \(it is 0.5\)"):
        job.compute(job.take(), lambda shard, push: pushed.append(shard))
    assert pushed == []


def test_the_advice_names_every_optimizer_setting_moved_from_its_default() -> None:
    spec = OptimizerSpec("adam", lr=0.05, weight_decay=1e30, beta2=0.0)
    assert spec.divergence_advice() == (
        "lower training.optimizer.lr (it is 0.05), check training.optimizer.weight_decay "
        "(it is 1e+30), check training.optimizer.beta2 (it is 0) or check the dataset's values"
    )
