"""Service cores without Kafka: the worker's step bookkeeping, role and id parsing, and the
shard process staying free of torch."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from maas.config import Settings
from maas.errors import InvalidArgument
from maas.training.prepare import Limits, PreparedJob, prepare_job
from services.aggregator.__main__ import build
from services.gradient_worker.__main__ import worker_id_from_env
from services.gradient_worker.core import ShardParams, WorkerJob


@pytest.fixture(scope="module")
def prepared() -> PreparedJob:
    return prepare_job(
        {
            "job_id": "w",
            "type": "train",
            "model": {"arch": "mlp", "config": {"hidden": [8]}},
            "dataset": {"uri": "builtin:digits"},
            "training": {"steps": 5, "workers": 2, "shards": 2, "gradient_codec": "int8"},
        },
        limits=Limits(2, 2, 1000),
    )


@pytest.fixture
def job(prepared: PreparedJob) -> WorkerJob:
    return WorkerJob(prepared.plan, 1, prepared.state, prepared.dataset)


def _params(job: WorkerJob, shard: int, version: int, final: bool = False) -> ShardParams:
    size = job.plan.partitions[shard].size
    return ShardParams(version, np.zeros(size, dtype=np.float32), final)


def test_a_worker_computes_once_per_new_version_of_every_shard(job: WorkerJob) -> None:
    assert job.receive(0, _params(job, 0, 0))
    assert not job.ready()  # shard 1 not heard from yet
    job.receive(1, _params(job, 1, 0))
    assert job.ready()
    outcome = job.compute(job.take())
    assert not job.ready()
    assert [(g.shard, g.version) for g in outcome.gradients] == [(0, 0), (1, 0)]
    assert outcome.batch.samples == 32 and outcome.step == 0
    job.receive(0, _params(job, 0, 1))
    assert not job.ready()  # shard 1 still at the version already used
    job.receive(1, _params(job, 1, 1))
    assert job.ready() and job.take()[1].version == 1


def test_older_or_repeated_parameters_are_ignored(job: WorkerJob) -> None:
    job.receive(0, _params(job, 0, 7))
    assert not job.receive(0, _params(job, 0, 6))
    assert not job.receive(0, _params(job, 0, 7))
    assert job.receive(0, _params(job, 0, 7, final=True))


def test_a_job_is_finished_when_every_shard_is_final(job: WorkerJob) -> None:
    job.receive(1, _params(job, 1, 9))
    job.receive(0, _params(job, 0, 9, final=True))
    assert not job.finished
    job.receive(1, _params(job, 1, 9, final=True))
    assert job.finished and not job.ready()


def test_the_worker_id_must_fit_the_deployment() -> None:
    settings = Settings(gradient_workers=2)
    with pytest.raises(InvalidArgument, match="MAAS_WORKER_ID=2 must be in 0..1"):
        worker_id_from_env(settings, {"MAAS_WORKER_ID": "2"})
    assert worker_id_from_env(settings, {"MAAS_WORKER_ID": "1"}) == 1


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MAAS_AGGREGATOR_ROLE": "leader"}, "MAAS_AGGREGATOR_ROLE='leader' is unknown"),
        ({"MAAS_AGGREGATOR_SHARD": "3"}, r"MAAS_AGGREGATOR_SHARD=3 must be in 0..1"),
        ({"MAAS_AGGREGATOR_SHARD": "one"}, "is not an integer"),
    ],
)
def test_a_bad_aggregator_role_or_shard_is_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        build(Settings(aggregator_shards=2), env)


def test_an_aggregator_shard_never_loads_torch() -> None:
    # torch alone is ~0.5 GB of resident memory: a shard's budget is its partition, not that.
    code = (
        "import sys; from maas.config import Settings; from services.aggregator.__main__ "
        "import build; build(Settings(), {}); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
