"""Distributed training on the real stack: the coordinator, two aggregator shards and two
gradient workers as real processes, jobs and statuses on the real broker, gradients and
parameters on the real gRPC data plane, checkpoints in the real S3 server, results in a real
registry.

Tests run in file order and share the processes; the fault tests kill a process with SIGKILL
and start it again before they end.
"""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import numpy as np
import pytest
import torch
from training_jobs import (
    MLP_TRAINING,
    assert_same_weights,
    assignment,
    job_plane_fixtures,
    pointer,
    reference_weights,
    run,
    train_job,
    training_cluster,
    wait_for_checkpoint,
    weights,
)

from infra.harness.offsets import wait_committed
from infra.harness.training import TrainingProcesses, start_all
from maas import events, topics
from maas.registry import RegistryClient
from maas.store import DATASETS_BUCKET, ObjectStore
from services.aggregator.coordinator import GROUP_ID as COORDINATOR_GROUP

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

WORKERS = MLP_TRAINING["workers"]
SHARDS = MLP_TRAINING["shards"]


@pytest.fixture(scope="module")
def cluster(stack, tmp_path_factory) -> Iterator[TrainingProcesses]:
    with training_cluster(tmp_path_factory.mktemp("training"), WORKERS, SHARDS) as training:
        yield training


producer, watcher = job_plane_fixtures("test-training")


@pytest.fixture(scope="module")
async def registry(stack, cluster) -> AsyncIterator[RegistryClient]:
    settings = stack.settings.replace(registry_addr=cluster.env["MAAS_REGISTRY_ADDR"])
    async with RegistryClient(settings, actor="test") as client:
        yield client


@pytest.fixture(scope="module")
async def mlp_baseline(cluster, producer, watcher) -> dict[str, Any]:
    """An undisturbed 2 workers x 2 shards digits MLP run (shared by the fault tests)."""
    job = train_job("digits-mlp", "mlp", {"uri": "builtin:digits"}, MLP_TRAINING)
    return await run(producer, watcher, job)


# --- bad input --------------------------------------------------------------------------------


async def test_an_invalid_job_fails_with_the_reason_and_is_dead_lettered(
    cluster, producer, watcher
):
    training = {"steps": 5, "workers": 2, "min_workers": 3}
    status = await run(
        producer, watcher, train_job("bad", "mlp", {"uri": "builtin:digits"}, training)
    )
    reason = "training.min_workers=3 must be at most training.workers=2"
    assert status["state"] == "failed"
    assert reason in status["error"]["message"]
    assert status["error"]["code"] == "invalid_argument"
    letters = await watcher.letters(status["job_id"], "maas-training")
    assert letters and reason in letters[0]["reason"]["message"]


async def test_a_job_with_an_unknown_arch_fails_naming_the_field(cluster, producer, watcher):
    job = train_job("bad-arch", "transformer", {"uri": "builtin:digits"}, {"steps": 5})
    status = await run(producer, watcher, job)
    assert status["state"] == "failed"
    assert "arch" in status["error"]["message"] and "transformer" in status["error"]["message"]


async def test_a_job_whose_step_cannot_be_computed_is_refused_at_intake_naming_both_fields(
    cluster, producer, watcher
):
    # Batch norm in training mode cannot normalise a batch of one row: the worker's first step
    # failed (a traceback in its log); intake now refuses it, naming the batch size and layer.
    training = {"steps": 5, "workers": 1, "batch_size": 1}
    layers = [{"type": "linear", "out_features": 8}, {"type": "batchnorm"}]
    config = {"input_shape": [64], "layers": layers, "num_classes": 10}
    job = train_job("one-row", "sequential", {"uri": "builtin:digits"}, training, config=config)
    status = await run(producer, watcher, job)
    assert status["state"] == "failed", status
    assert status["error"]["code"] == "invalid_argument"
    message = status["error"]["message"]
    assert "training.batch_size=1: model.config.layers[1] (batchnorm)" in message, message


# --- learning ---------------------------------------------------------------------------------


async def test_digits_mlp_on_two_workers_and_two_shards_reaches_95_percent(
    mlp_baseline, registry, watcher
):
    assert mlp_baseline["state"] == "succeeded", mlp_baseline
    assert mlp_baseline["metrics"]["accuracy"] >= 0.95
    assert mlp_baseline["metrics"]["samples_per_s"] > 0
    version = await registry.get(
        f"{mlp_baseline['model']['name']}@{mlp_baseline['model']['version']}"
    )
    assert version.method == "train"
    assert version.metrics["accuracy"] == pytest.approx(mlp_baseline["metrics"]["accuracy"])
    states = {s["state"] for s in watcher.statuses[version.job_id]}
    assert {"accepted", "running", "checkpointed", "succeeded"} <= states


async def test_the_live_job_ends_with_the_weights_of_the_in_process_reference(
    mlp_baseline, registry, watcher
):
    """2 workers x 2 shards, codec none, quorum 1.0: the services' result equals the same job
    run in this process by the real worker loop and shard cores (``simulate``)."""
    assert mlp_baseline["state"] == "succeeded", mlp_baseline
    job = train_job("digits-mlp", "mlp", {"uri": "builtin:digits"}, MLP_TRAINING)
    reference = await reference_weights(job)
    # A failure names the tensor and how far it is off; the job's membership changes say
    # whether the run itself was disturbed (a worker removed or joined) or the numbers differ.
    changes = [s["workers"] for s in watcher.statuses[mlp_baseline["job_id"]] if "workers" in s]
    try:
        assert_same_weights(await weights(registry, mlp_baseline), reference)
    except AssertionError as mismatch:
        raise AssertionError(f"{mismatch}\nmembership changes in the job: {changes}") from None


CNN_TRAINING = {
    "steps": 60,
    "batch_size": 32,
    "workers": WORKERS,
    "shards": SHARDS,
    "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
}
FEW_SHOT = {"uri": "builtin:digits-5-9", "fraction": 0.1}
FEW_SHOT_TRAINING = {
    "steps": 30,
    "batch_size": 16,
    "workers": WORKERS,
    "shards": SHARDS,
    "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
    "seed": 1,
}


@pytest.fixture(scope="module")
async def cnn_base(cluster, producer, watcher) -> dict[str, Any]:
    """A CNN trained on digits 0-4 (10-way head): the base of the transfer test."""
    job = train_job(
        "digits-cnn-0-4",
        "cnn",
        {"uri": "builtin:digits-0-4"},
        CNN_TRAINING,
        register_as={"name": "digits-cnn-0-4", "alias": "production"},
    )
    return await run(producer, watcher, job)


async def test_a_net_with_batch_norm_is_registered_with_statistics_of_its_training_rows(
    cluster, producer, watcher, registry
):
    # The shards train parameters only: the norm's running mean and variance stayed 0 and 1,
    # and a model trained to 0.98 was registered and served at 0.39.
    layers = [{"type": "linear", "out_features": 16}, {"type": "batchnorm"}, {"type": "relu"}]
    config = {"input_shape": [64], "layers": layers, "num_classes": 10}
    job = train_job(
        "batch-norm", "sequential", {"uri": "builtin:digits"}, MLP_TRAINING, config=config
    )
    status = await run(producer, watcher, job)
    assert status["state"] == "succeeded", status
    assert status["metrics"]["accuracy"] > 0.9
    model = await registry.load(f"{status['model']['name']}@{status['model']['version']}")
    norm = model.body[1]
    assert isinstance(norm, torch.nn.BatchNorm1d) and int(norm.num_batches_tracked) > 0
    assert not torch.equal(norm.running_var, torch.ones(16))


async def test_the_cnn_trains_well_above_chance(cnn_base, registry):
    assert cnn_base["state"] == "succeeded", cnn_base
    assert cnn_base["metrics"]["accuracy"] > 0.8  # chance is 0.2 on five classes
    assert (await registry.get("digits-cnn-0-4@production")).version == cnn_base["model"]["version"]


async def test_finetune_on_ten_percent_beats_training_from_scratch(
    cnn_base, producer, watcher, registry
):
    finetune = events.new_event(
        events.JOB,
        job_id=f"finetune-{uuid.uuid4().hex[:8]}",
        type="finetune",
        base={"name": "digits-cnn-0-4", "alias": "production"},
        model={"name": "digits-cnn-5-9"},
        dataset=FEW_SHOT,
        training={**FEW_SHOT_TRAINING, "freeze": ["features."]},
    )
    scratch = train_job(
        "digits-cnn-5-9-scratch", "cnn", FEW_SHOT, FEW_SHOT_TRAINING, config={"num_classes": 5}
    )
    tuned = await run(producer, watcher, finetune)
    fresh = await run(producer, watcher, scratch)
    assert tuned["state"] == fresh["state"] == "succeeded", (tuned, fresh)
    assert tuned["metrics"]["accuracy"] > fresh["metrics"]["accuracy"]
    lineage = await registry.get(f"digits-cnn-5-9@{tuned['model']['version']}")
    assert lineage.parent is not None and lineage.parent.name == "digits-cnn-0-4"
    assert lineage.parent.version == cnn_base["model"]["version"]
    assert lineage.method == "finetune" and lineage.job_id == finetune["job_id"]
    base_weights = await weights(registry, cnn_base)
    tuned_weights = await weights(registry, tuned)
    assert torch.equal(tuned_weights["features.0.weight"], base_weights["features.0.weight"])
    assert tuned_weights["head.weight"].shape == (5, 64 * 4 * 4)


async def test_a_redelivered_job_runs_once(stack, cluster, producer, watcher, registry):
    job = train_job("once", "mlp", {"uri": "builtin:digits"}, {**MLP_TRAINING, "steps": 20})
    await producer.send(topics.JOBS, job, key=job["job_id"])
    await producer.send(topics.JOBS, job, key=job["job_id"])  # redelivered while it runs
    status = await watcher.final(job["job_id"])
    await producer.send(topics.JOBS, job, key=job["job_id"])  # and once it is over
    await wait_committed(stack.settings, COORDINATOR_GROUP, topics.JOBS, 60)  # all 3 handled
    states = [
        s["state"]
        for s in watcher.statuses[job["job_id"]]
        if s["service"] == "training-coordinator"
    ]
    assert states.count("accepted") == 1 and states.count("succeeded") == 1
    assert states[-1] == "succeeded"
    registered = [v async for v in registry.iter_versions("once") if v.job_id == job["job_id"]]
    assert [v.version for v in registered] == [status["model"]["version"]]


async def test_another_job_under_a_used_job_id_is_dead_lettered_and_the_first_keeps_its_status(
    stack, cluster, producer, watcher
):
    job = train_job("taken", "mlp", {"uri": "builtin:digits"}, {**MLP_TRAINING, "steps": 5})
    first = await run(producer, watcher, job)
    other = {**job, "training": {**job["training"], "steps": 7}}
    await producer.send(topics.JOBS, other, key=job["job_id"])
    letters = await watcher.letters(job["job_id"], COORDINATOR_GROUP)
    assert letters[0]["reason"]["code"] == "already_exists"
    assert "send this one under a new job_id" in letters[0]["reason"]["message"]
    await wait_committed(stack.settings, COORDINATOR_GROUP, topics.JOBS, 60)
    coordinator = [
        s for s in watcher.statuses[job["job_id"]] if s["service"] == "training-coordinator"
    ]
    assert coordinator[-1]["state"] == first["state"] == "succeeded"


async def test_an_async_job_trains(cluster, producer, watcher):
    training = {**MLP_TRAINING, "steps": 80, "mode": "async", "staleness": 2}
    status = await run(
        producer, watcher, train_job("async", "mlp", {"uri": "builtin:digits"}, training)
    )
    assert status["state"] == "succeeded", status
    assert status["total_steps"] == 80 * WORKERS  # one version per applied gradient
    # Timing decides which gradients are stale, so only "learned a lot" is certain here;
    # async with staleness 0 equal to sync is the unit tests' exactness check.
    assert status["metrics"]["accuracy"] > 0.7


async def test_a_regression_dataset_from_s3_trains_with_mse(stack, cluster, producer, watcher):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(400, 8)).astype(np.float32)
    y = (x @ rng.normal(size=8)).astype(np.float32)
    buffer = io.BytesIO()
    np.savez(buffer, X=x, y=y)
    key = f"bench/{uuid.uuid4().hex[:8]}.npz"
    await asyncio.to_thread(
        ObjectStore(stack.settings).put_bytes, DATASETS_BUCKET, key, buffer.getvalue()
    )
    job = train_job(
        "regression",
        "mlp",
        {"uri": f"s3://{DATASETS_BUCKET}/{key}"},
        {**MLP_TRAINING, "steps": 40, "optimizer": {"name": "adam", "lr": 0.01}},
        config={"in_features": 8, "hidden": [16], "num_classes": 1},
    )
    status = await run(producer, watcher, job)
    assert status["state"] == "succeeded", status
    assert "accuracy" not in status["metrics"]
    assert status["metrics"]["loss"] < float(np.var(y))  # beats predicting the mean


# --- duplicates and faults --------------------------------------------------------------------


async def test_a_worker_killed_mid_job_is_removed_after_the_heartbeat_timeout(
    stack, cluster, producer, watcher
):
    job = train_job("quorum", "mlp", {"uri": "builtin:digits"}, {**MLP_TRAINING, "steps": 400})
    await producer.send(topics.JOBS, job, key=job["job_id"])
    store = ObjectStore(stack.settings)
    await wait_for_checkpoint(store, job["job_id"], shard=0, version=40)
    holder = _by_name(cluster.workers, assignment(watcher, job["job_id"])["workers"][1]["member"])
    cluster.kill(holder)
    try:
        assert not (await pointer(store, job["job_id"], shard=0)).final, "killed too late"
        status = await watcher.final(job["job_id"])
    finally:
        start_all([holder])
    assert status["state"] == "succeeded", status
    assert status["metrics"]["accuracy"] > 0.9
    changes = [s["workers"] for s in watcher.statuses[job["job_id"]] if "workers" in s]
    for shard in range(SHARDS):  # quorum 1.0: only an explicit removal let the steps close
        removed = [c for c in changes if c["shard"] == shard and "worker 1 removed" in c["change"]]
        assert removed and removed[0]["active"] == [0], changes


async def test_an_aggregator_shard_killed_and_restarted_ends_like_an_undisturbed_run(
    stack, cluster, producer, watcher, registry, mlp_baseline
):
    job = train_job("digits-mlp", "mlp", {"uri": "builtin:digits"}, MLP_TRAINING)
    await producer.send(topics.JOBS, job, key=job["job_id"])
    store = ObjectStore(stack.settings)
    await wait_for_checkpoint(store, job["job_id"], shard=1, version=40)
    cluster.kill(cluster.shards[1])
    assert not (await pointer(store, job["job_id"], shard=1)).final, "killed too late"
    await asyncio.sleep(1.0)
    start_all([cluster.shards[1]])
    status = await watcher.final(job["job_id"])
    assert status["state"] == "succeeded", status
    # The workers pushed again what the checkpoint lacked: the replay is exact.
    assert_same_weights(await weights(registry, status), await weights(registry, mlp_baseline))


async def test_a_worker_and_then_its_shard_restarted_mid_job_do_not_stall_it(
    stack, cluster, producer, watcher
):
    # The restarted worker keeps nothing its predecessor pushed, and the shard resumes from a
    # checkpoint older than that: the worker says from which version it can push, and the
    # shard goes on without it until then (computing on mixed versions stalled the job).
    job = train_job(
        "restart-both", "mlp", {"uri": "builtin:digits"}, {**MLP_TRAINING, "steps": 400}
    )
    await producer.send(topics.JOBS, job, key=job["job_id"])
    store = ObjectStore(stack.settings)
    await wait_for_checkpoint(store, job["job_id"], shard=1, version=50)
    holder = _by_name(cluster.workers, assignment(watcher, job["job_id"])["workers"][1]["member"])
    cluster.kill(holder)
    cluster.kill(cluster.shards[1])
    assert not (await pointer(store, job["job_id"], shard=1)).final, "killed too late"
    await asyncio.to_thread(start_all, [cluster.shards[1], holder])
    status = await watcher.final(job["job_id"])
    assert status["state"] == "succeeded", status
    assert status["metrics"]["accuracy"] > 0.9


def _by_name(services: list, name: str):  # type: ignore[no-untyped-def]
    (service,) = [s for s in services if s.name == name]
    return service


async def test_a_second_process_under_a_held_member_id_stops_naming_the_holder(cluster):
    holder = cluster.workers[0]
    twin = cluster.spawn(
        "gradient-worker-twin", "services.gradient_worker", MAAS_MEMBER_ID=holder.name
    )
    try:
        deadline = time.monotonic() + 120
        while twin.process.alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert not twin.process.alive(), "the twin kept running under a held id"
    finally:
        twin.stop()
    log = twin.process.log_file.read_text(errors="replace")
    assert f"member id {holder.name!r} is held by another process" in log
    assert holder.process.alive()


# --- cancelling -------------------------------------------------------------------------------


def cancel_event(job: dict[str, Any]) -> dict[str, Any]:
    return events.new_event(events.JOB, job_id=job["job_id"], type="cancel")


async def test_a_running_job_is_cancelled_and_its_workers_are_free_again(
    cluster, producer, watcher
):
    long = train_job(
        "cancel-run", "mlp", {"uri": "builtin:digits"}, {**MLP_TRAINING, "steps": 5000}
    )
    await producer.send(topics.JOBS, long, key=long["job_id"])
    await watcher.state(long["job_id"], "running")
    await producer.send(topics.JOBS, cancel_event(long), key=long["job_id"])
    status = await watcher.final(long["job_id"])
    assert status["state"] == "cancelled", status
    short = train_job("after-cancel", "mlp", {"uri": "builtin:digits"}, MLP_TRAINING)
    assert (await run(producer, watcher, short))["state"] == "succeeded"


async def test_maas_jobs_cancel_stops_a_queued_job_before_it_runs(
    stack, cluster, producer, watcher
):
    training = {**MLP_TRAINING, "workers": len(cluster.workers) + 3}
    job = train_job("cancel-queued", "mlp", {"uri": "builtin:digits"}, training)
    await producer.send(topics.JOBS, job, key=job["job_id"])
    await watcher.state(job["job_id"], "queued")
    s = stack.settings
    env = {**os.environ, "MAAS_KAFKA_BOOTSTRAP": s.kafka_bootstrap, "MAAS_STATE_DIR": s.state_dir}
    command = [sys.executable, "-m", "maas", "jobs", "cancel", job["job_id"], "--timeout-s", "90"]
    cli = await asyncio.to_thread(
        subprocess.run, command, env=env, capture_output=True, text=True, timeout=180
    )
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert "cancelled" in cli.stdout
    status = await watcher.final(job["job_id"])
    assert status["state"] == "cancelled", status
    assert not [s for s in watcher.statuses[job["job_id"]] if s["state"] == "running"]


# --- the elastic pool (these add workers: they run last) ---------------------------------------


async def test_a_job_wanting_more_workers_than_the_pool_has_is_queued_until_one_joins(
    cluster, producer, watcher
):
    job = train_job(
        "pool-wait", "mlp", {"uri": "builtin:digits"}, {**MLP_TRAINING, "workers": 3, "steps": 40}
    )
    await producer.send(topics.JOBS, job, key=job["job_id"])
    queued = await watcher.state(job["job_id"], "queued")
    assert "waiting for 3 free gradient workers" in queued["reason"], queued
    assert not [s for s in watcher.statuses[job["job_id"]] if s["state"] == "running"]
    cluster.add_worker()
    status = await watcher.final(job["job_id"])
    assert status["state"] == "succeeded", status
    assert len(assignment(watcher, job["job_id"])["workers"]) == 3


async def test_a_worker_started_mid_job_takes_the_vacant_rank_and_the_job_converges(
    cluster, producer, watcher
):
    # Long enough that the newcomer (a fresh process importing torch: 3-5 s idle, up to ~40 s on a
    # loaded machine) arrives well before the end: 2 000 steps once ran out first on a fast
    # machine (the job took ~5 s); 3 000 steps take 60-100 s on a 2-core one. Checkpoints are
    # sparse because with one every 20 steps they were a third of the job's time.
    sizes = {"workers": 4, "min_workers": 3, "steps": 3000, "checkpoint_every": 500}
    training = {**MLP_TRAINING, **sizes}
    job = train_job("pool-join", "mlp", {"uri": "builtin:digits"}, training)
    await producer.send(topics.JOBS, job, key=job["job_id"])
    await watcher.state(job["job_id"], "running")
    assert len(assignment(watcher, job["job_id"])["workers"]) == 3
    newcomer = cluster.add_worker()
    status = await watcher.final(job["job_id"], timeout_s=300)
    assert status["state"] == "succeeded", status
    assert status["metrics"]["accuracy"] > 0.9
    final = assignment(watcher, job["job_id"])
    assert final["epoch"] > 1, f"the job ended before {newcomer.name} registered: raise its steps"
    assert {"rank": 3, "member": newcomer.name} in final["workers"], final
    reasons = [s.get("reason", "") for s in watcher.statuses[job["job_id"]]]
    assert any(f"{newcomer.name} joined as rank 3" in r for r in reasons), reasons


async def test_two_concurrent_jobs_run_on_disjoint_workers(cluster, producer, watcher):
    assert len(cluster.workers) >= 4
    jobs = [
        train_job(f"pool-pair-{i}", "mlp", {"uri": "builtin:digits"}, {**MLP_TRAINING, "steps": 60})
        for i in range(2)
    ]
    for job in jobs:
        await producer.send(topics.JOBS, job, key=job["job_id"])
    statuses = await asyncio.gather(*(watcher.final(j["job_id"]) for j in jobs))
    assert [s["state"] for s in statuses] == ["succeeded", "succeeded"], statuses
    first, second = (
        {w["member"] for w in assignment(watcher, j["job_id"])["workers"]} for j in jobs
    )
    assert len(first) == len(second) == 2 and not first & second
