"""A job that can make no progress fails instead of waiting forever: its only gradient worker is
killed mid-job, no other worker is free, and the coordinator (stall timeout shortened to
STALL_MS) ends the job ``failed`` with the stall's reason. The pool stays usable: a worker
started afterwards trains the next job."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from training_jobs import (
    MLP_TRAINING,
    job_plane_fixtures,
    run,
    train_job,
    training_cluster,
    wait_for_checkpoint,
)

from infra.harness.training import TrainingProcesses
from maas import topics
from maas.store import ObjectStore

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

STALL_MS = 5000


@pytest.fixture(scope="module")
def cluster(stack, tmp_path_factory) -> Iterator[TrainingProcesses]:
    with training_cluster(
        tmp_path_factory.mktemp("stall"),
        workers=1,
        shards=1,
        MAAS_JOB_STALL_TIMEOUT_MS=str(STALL_MS),
    ) as training:
        yield training


producer, watcher = job_plane_fixtures("test-job-stall")


async def test_a_job_left_without_workers_fails_naming_the_stall(stack, cluster, producer, watcher):
    training = {**MLP_TRAINING, "workers": 1, "shards": 1, "steps": 100_000}
    job = train_job("stall", "mlp", {"uri": "builtin:digits"}, training)
    await producer.send(topics.JOBS, job, key=job["job_id"])
    await wait_for_checkpoint(ObjectStore(stack.settings), job["job_id"], shard=0, version=50)
    await asyncio.to_thread(cluster.kill, cluster.workers[0])
    status = await watcher.final(job["job_id"], timeout_s=120)
    assert status["state"] == "failed", status
    assert f"no progress for {STALL_MS} ms" in status["error"]["message"]
    assert "are gradient workers and aggregator shards running?" in status["error"]["message"]
    await asyncio.to_thread(cluster.use_workers, 1)  # a fresh worker: the pool trains again
    after = await run(
        producer,
        watcher,
        train_job(
            "after",
            "mlp",
            {"uri": "builtin:digits"},
            {**MLP_TRAINING, "workers": 1, "shards": 1, "steps": 10},
        ),
    )
    assert after["state"] == "succeeded", after
