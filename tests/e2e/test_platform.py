"""The whole platform as a newcomer meets it: the local stack of docker-compose.yml's services on
a real broker and S3 server, driven only through public surfaces — a plain Kafka producer, the
`maas` CLI, tritonclient over gRPC — and taken down again without leaving a process behind."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import torch
import tritonclient.grpc as triton
from platform_jobs import JOB_TIMEOUT_S, a_job, cli_env, final_status, publish_plain_json
from training_jobs import assert_same_weights, reference_weights

from infra.ephemeral import private_stack
from infra.stack import LocalStack
from maas import jobs
from maas.config import Settings
from maas.datasets import load_builtin
from maas.edge import call_metadata
from maas.policy import ACTOR, policy_job_id
from maas.registry import AliasChange, RegistryClient

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

# With MAAS_E2E_USE_RUNNING_STACK=1 the same tests run against whatever MAAS_* points at, e.g.
# `docker compose up` with infra/docker/e2e.env (see docs/OPERATIONS.md).
USE_RUNNING = os.environ.get("MAAS_E2E_USE_RUNNING_STACK") == "1"


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack | None]:
    if USE_RUNNING:
        yield None
        return
    local = private_stack(tmp_path_factory.mktemp("e2e-state"), with_services=True)
    try:
        local.up(timeout_s=300)
        yield local
    finally:
        local.down()


@pytest.fixture(scope="module")
def settings(platform: LocalStack | None) -> Settings:
    return Settings.from_env() if platform is None else platform.settings


@pytest.fixture(scope="module")
async def trained(settings: Settings) -> jobs.JobSummary:
    job = a_job(
        "train",
        model={"name": "e2e-digits", "arch": "mlp", "config": {"hidden": [64]}},
        dataset={"uri": "builtin:digits"},
        training={
            "steps": 120,
            "batch_size": 32,
            "workers": 2,
            "shards": 2,
            "mode": "sync",
            "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        },
        register_as={"name": "e2e-digits", "alias": "production"},
    )
    await publish_plain_json(settings, job)
    return await final_status(settings, job["job_id"])


async def test_a_job_from_a_plain_kafka_producer_trains_and_registers(trained):
    assert trained.state == "succeeded", trained.error
    assert trained.model is not None and trained.model["name"] == "e2e-digits"
    assert trained.metrics["accuracy"] >= 0.9


async def test_the_model_answers_over_grpc_like_an_in_process_forward_pass(settings, trained):
    rows = load_builtin("digits").x_test[:8].astype(np.float32)
    client = triton.InferenceServerClient(settings.inference_addr)
    headers = dict(call_metadata(settings))  # the stack's admin token (auth is on by default)
    try:
        # alias production, as a bare name means
        assert client.is_model_ready("e2e-digits", headers=headers)
        metadata = client.get_model_metadata("e2e-digits", headers=headers)
        inputs = [triton.InferInput(metadata.inputs[0].name, list(rows.shape), "FP32")]
        inputs[0].set_data_from_numpy(rows)
        served = client.infer("e2e-digits", inputs, headers=headers)
        served = served.as_numpy(metadata.outputs[0].name)
    finally:
        client.close()
    async with RegistryClient(settings) as registry:
        model = await registry.load(f"e2e-digits@{trained.model['version']}")

    with torch.no_grad():
        local = model(torch.from_numpy(rows)).numpy()
    np.testing.assert_allclose(served, local, rtol=1e-4, atol=1e-5)


async def test_a_compress_job_yields_registered_variants_with_lineage(settings, trained):
    base = {"name": "e2e-digits", "version": trained.model["version"]}
    job = a_job(
        "compress",
        base=base,
        compress={
            "methods": [
                {"quantize": {"dtype": "int8"}},
                {"prune": {"sparsity": 0.5, "recovery_steps": 20}},
            ]
        },
    )
    await publish_plain_json(settings, job)
    summary = await final_status(settings, job["job_id"])
    assert summary.state == "succeeded", summary.error
    async with RegistryClient(settings) as registry:
        variants = [
            v async for v in registry.iter_versions("e2e-digits") if v.job_id == job["job_id"]
        ]
    assert sorted(v.method for v in variants) == ["prune", "quantize"]
    assert all(str(v.parent) == f"e2e-digits@{base['version']}" for v in variants)


def test_a_mistaken_job_file_is_refused_by_the_cli_before_publishing(settings, tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "type: train\nmodel: {name: x, arch: mlp}\ndataset: {uri: 'builtin:digits'}\n"
        "training: {optimizer: {name: sgd, lr: -0.1}}\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "maas.cli", "jobs", "submit", str(bad)],
        env=cli_env(settings),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "training.optimizer.lr" in result.stderr


def test_the_cli_refuses_a_job_under_an_id_accepted_for_other_content(
    settings, trained, tmp_path: Path
):
    # Published, it would be dead-lettered (already_exists), and watching the id would show
    # the first job's result as if it were this one's.
    other = tmp_path / "other.yaml"
    other.write_text(
        f"job_id: {trained.job_id}\ntype: train\nmodel: {{name: x, arch: mlp}}\n"
        "dataset: {uri: 'builtin:digits'}\ntraining: {steps: 5}\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "maas.cli", "jobs", "submit", str(other), "--watch"],
        env=cli_env(settings),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stdout
    assert f"job_id '{trained.job_id}' belongs to another job" in result.stderr


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"model": {"name": "x", "arch": "transformer"}}, "transformer"),
        ({"dataset": None}, "dataset"),
    ],
)
async def test_a_mistaken_job_published_raw_fails_naming_the_field(settings, change, field):
    job = a_job(
        "train",
        model={"name": "x", "arch": "mlp"},
        dataset={"uri": "builtin:digits"},
        training={"steps": 5},
    )
    job.update(change)
    job = {k: v for k, v in job.items() if v is not None}
    await publish_plain_json(settings, job)
    summary = await final_status(settings, job["job_id"])
    assert summary.state == "failed"
    assert field in summary.error["message"]


# --- the closed loop: a model with a policy is compressed, promoted and served by events alone ---

POLICY_MODEL = "e2e-policy-digits"
POLICY = {
    "on_registered": {"compress": {"methods": [{"quantize": {"dtype": "int8"}}]}},
    "promote": {
        "alias": "production",
        "rule": "smallest_within",
        "within": 0.05,
        "require": {"accuracy": 0.8},
    },
}


async def promotion(registry: RegistryClient) -> AliasChange:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        moves = await registry.alias_history(POLICY_MODEL, "production")
        if moves:
            return moves[-1]
        await asyncio.sleep(0.5)
    raise AssertionError(f"{POLICY_MODEL}@production never moved")


def served_version(settings: Settings, rows: np.ndarray, want: str) -> str:
    """The version the bare name answers with, once it is ``want`` (the swap is asynchronous)."""
    client = triton.InferenceServerClient(settings.inference_addr)
    headers = dict(call_metadata(settings))
    deadline, seen = time.monotonic() + 60, ""
    try:
        while time.monotonic() < deadline and seen != want:
            metadata = client.get_model_metadata(POLICY_MODEL, headers=headers)
            inputs = [triton.InferInput(metadata.inputs[0].name, list(rows.shape), "FP32")]
            inputs[0].set_data_from_numpy(rows)
            answer = client.infer(POLICY_MODEL, inputs, headers=headers)
            assert answer.as_numpy(metadata.outputs[0].name).shape[0] == len(rows)
            seen = answer.get_response().model_version
            time.sleep(0.5)
    finally:
        client.close()
    return seen


async def test_a_train_job_on_a_model_with_a_policy_ends_with_a_variant_promoted_and_served(
    settings,
):
    async with RegistryClient(settings) as registry:
        await registry.set_policy(POLICY_MODEL, POLICY)
    job = a_job(
        "train",
        model={"name": POLICY_MODEL, "arch": "mlp", "config": {"hidden": [32]}},
        dataset={"uri": "builtin:digits"},
        training={
            "steps": 60,
            "batch_size": 32,
            "workers": 1,
            "shards": 1,
            "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        },
        register_as={"name": POLICY_MODEL},
    )
    await publish_plain_json(settings, job)
    trained = await final_status(settings, job["job_id"])
    assert trained.state == "succeeded", trained.error
    parent = trained.model["version"]
    plan = await final_status(settings, policy_job_id(POLICY_MODEL, parent))
    assert plan.state == "succeeded", plan.error
    (variant,) = plan.models
    async with RegistryClient(settings) as registry:
        move = await promotion(registry)
        promoted = await registry.get(f"{POLICY_MODEL}@production")
    assert (move.from_version, move.to_version) == (None, variant["version"])
    assert promoted.method == "quantize" and str(promoted.parent) == f"{POLICY_MODEL}@{parent}"
    assert move.reason.startswith(f"{ACTOR} (policy v1): smallest within 5.0 points of v{parent}")
    assert move.actor  # the compressor's token identity
    rows = load_builtin("digits").x_test[:4].astype(np.float32)
    seen = await asyncio.to_thread(served_version, settings, rows, str(variant["version"]))
    assert seen == str(variant["version"])


# --- a service killed mid-job (SIGKILL, no goodbye), then started again -------------------------

CHAOS_MODEL = "e2e-chaos"


def chaos_job() -> dict[str, Any]:
    return a_job(
        "train",
        model={"name": CHAOS_MODEL, "arch": "mlp", "config": {"hidden": [64]}},
        dataset={"uri": "builtin:digits"},
        training={
            "steps": 600,
            "batch_size": 32,
            "workers": 2,
            "shards": 2,
            "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        },
        register_as={"name": CHAOS_MODEL},
    )


async def until_running(settings: Settings, job_id: str, step: int = 0) -> jobs.JobSummary:
    """Once the job runs (at ``step`` or later), or is over."""
    async with contextlib.aclosing(jobs.watch(settings, job_id, timeout_s=JOB_TIMEOUT_S)) as seen:
        async for summary in seen:
            if (summary.state == "running" and summary.step >= step) or summary.done:
                return summary
    raise AssertionError(f"job {job_id} never ran")


def kill_and_restart(platform: LocalStack, name: str) -> None:
    (victim,) = [s for s in platform.services if s.name == name]
    pid = victim.process.pid()
    assert pid is not None, f"{name} is not running"
    os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(psutil.NoSuchProcess):  # its parent, the exit recorder, reaps it
        psutil.wait_procs([psutil.Process(pid)], timeout=10)
    platform.up(bootstrap=False, timeout_s=300)  # starts what is not running: the victim


@pytest.mark.skipif(USE_RUNNING, reason="the stack under test is not ours to kill")
@pytest.mark.parametrize(
    "victim", ["training-coordinator", "aggregator", "gradient-worker", "model-registry"]
)
async def test_a_service_killed_mid_training_and_restarted_loses_and_repeats_nothing(
    platform, settings, victim
):
    job = chaos_job()
    await publish_plain_json(settings, job)
    await until_running(settings, job["job_id"], step=20)
    await asyncio.to_thread(kill_and_restart, platform, victim)
    summary = await final_status(settings, job["job_id"])
    assert summary.state in ("succeeded", "failed"), summary
    async with RegistryClient(settings) as registry:
        mine = [v async for v in registry.iter_versions(CHAOS_MODEL) if v.job_id == job["job_id"]]
        if summary.state == "succeeded" and victim in EXACT_AFTER_A_RESTART:
            stored = await registry.load(f"{CHAOS_MODEL}@{summary.model['version']}")
            # Nothing lost and nothing applied twice: the weights of an undisturbed run.
            assert_same_weights(stored.state_dict(), await reference_weights(job))
    if summary.state == "failed":
        assert summary.error and summary.error["message"]
        assert mine == []
    else:
        assert [v.version for v in mine] == [summary.model["version"]]  # once, never twice


# A killed worker may be removed from its job once its heartbeat times out (then the rest go on
# without its gradients, by design); these restarts must not change a single update.
EXACT_AFTER_A_RESTART = ("training-coordinator", "aggregator", "model-registry")


@pytest.mark.skipif(USE_RUNNING, reason="the stack under test is not ours to kill")
async def test_the_compressor_killed_mid_job_and_restarted_registers_each_variant_once(
    platform, settings, trained
):
    base = {"name": "e2e-digits", "version": trained.model["version"]}
    methods = [{"quantize": {"dtype": "int8"}}, {"prune": {"sparsity": 0.5, "recovery_steps": 200}}]
    job = a_job("compress", base=base, compress={"methods": methods})
    await publish_plain_json(settings, job)
    await until_running(settings, job["job_id"])
    await asyncio.to_thread(kill_and_restart, platform, "compressor")
    summary = await final_status(settings, job["job_id"])
    assert summary.state == "succeeded", summary.error
    async with RegistryClient(settings) as registry:
        mine = [v async for v in registry.iter_versions("e2e-digits") if v.job_id == job["job_id"]]
    assert sorted(v.method for v in mine) == ["prune", "quantize"]


@pytest.mark.skipif(USE_RUNNING, reason="the stack under test is not ours to kill")
def test_inference_killed_and_restarted_answers_again(platform, settings, trained):
    kill_and_restart(platform, "inference")
    client = triton.InferenceServerClient(settings.inference_addr)
    try:
        assert client.is_model_ready("e2e-digits", headers=dict(call_metadata(settings)))
    finally:
        client.close()


@pytest.mark.skipif(USE_RUNNING, reason="the logs of a running stack are not ours to read")
def test_no_log_of_the_run_holds_a_secret(platform: LocalStack, settings: Settings):
    """After training, compressing and serving: no token and no S3 secret in any log of the
    stack (every service's, the broker's and the S3 server's)."""
    auth_dir = Path(settings.state_dir) / "auth"
    secrets = [p.read_text().strip() for p in auth_dir.glob("*.token")]
    assert len(secrets) >= 4
    secrets.append(settings.s3_secret_key)
    logs = [service.process.log_file for service in platform.services]
    assert logs and all(p.stat().st_size for p in logs)
    logs += [platform.stack_dir / "kafka.log", platform.stack_dir / "s3.log"]
    leaks = [(p.name, s[:8]) for p in logs for s in secrets if s in p.read_text(errors="replace")]
    assert leaks == []


@pytest.mark.skipif(USE_RUNNING, reason="the stack under test is not ours to stop")
def test_stack_down_leaves_no_process_behind(platform: LocalStack):
    pids = [row.pid for row in platform.status() if row.pid]
    assert len(pids) == len(platform.components())
    platform.down()
    still = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    assert still == []
    marker = str(platform.stack_dir)
    leftovers = [
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if any(marker in part for part in (p.info["cmdline"] or []))
    ]
    assert leftovers == []
