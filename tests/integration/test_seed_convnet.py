"""The seed's own network on the real stack: examples/jobs/seed-convnet-mse.yaml (a `sequential`
Conv2d(1, 32, 3, 1) -> Conv2d(32, 64, 3, 1) ... net, MSE against one-hot labels) trained by the
training processes, registered, then served over OIP gRPC with exactly the answers an
in-process forward of the registered weights gives.

CI size: 100 steps (the file's 300 reach ~97% accuracy; 100 already ~75%, chance is 10%).
The same net also trains on the digits put into the datasets bucket by a plain S3 client (no
sha256 metadata): the services hash it on first use instead of refusing it.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as triton

from infra.harness.serving import ServiceProcesses
from infra.harness.training import TrainingProcesses
from maas import datasets, jobs, zoo
from maas.datasets import load_builtin
from maas.registry import RegistryClient
from maas.store import DATASETS_BUCKET, ObjectStore

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "jobs" / "seed-convnet-mse.yaml"
CI_STEPS = 100


async def train(settings, doc, steps: int) -> jobs.JobSummary:
    """Submit the job the way `maas jobs submit` does and follow it to the end."""
    doc["training"]["steps"] = steps
    job = jobs.check_job(jobs.prepare_job(doc, f"seed-{uuid.uuid4().hex[:8]}"), settings)
    await jobs.publish_job(settings, job)
    async for summary in jobs.watch(settings, job["job_id"], timeout_s=420):
        final = summary
    return final


@pytest.fixture(scope="module")
def servers(stack, tmp_path_factory) -> Iterator[tuple[str, str]]:
    workdir = tmp_path_factory.mktemp("seed-convnet")
    with ServiceProcesses(workdir) as processes:
        registry = processes.start_registry()
        inference = processes.start_inference("inference-seed", registry, MAAS_AUTH="off")
        with TrainingProcesses(
            workdir, registry, workers=1, shards=1, MAAS_PROGRESS_INTERVAL_MS="1000"
        ) as training:
            training.start()
            yield registry, inference


async def test_the_seed_convnet_trains_with_mse_and_is_served_as_computed(stack, servers):
    registry_addr, inference_addr = servers
    doc = jobs.load_job_file(EXAMPLE)
    final = await train(stack.settings, doc, CI_STEPS)
    assert final.state == "succeeded", final.error
    assert final.metrics["accuracy"] > 0.5
    name, number = final.model["name"], final.model["version"]

    settings = stack.settings.replace(registry_addr=registry_addr)
    async with RegistryClient(settings, actor="test") as registry:
        version = await registry.get(f"{name}@{number}")
        model = await registry.load(f"{name}@{number}")
        # Registered with alias staging, not production: a bare name finds the trained version.
        assert (await registry.get(name)).version == number
    assert version.arch == "sequential" and version.method == "train"
    assert version.config == zoo.config_to_dict(
        zoo.parse_config("sequential", doc["model"]["config"])
    )

    rows = load_builtin("digits").x_test[:16]
    with torch.no_grad():
        expected = model(torch.from_numpy(rows)).numpy()
    client = triton.InferenceServerClient(inference_addr)
    try:
        metadata = client.get_model_metadata(name, str(number))
        request = triton.InferInput(metadata.inputs[0].name, list(rows.shape), "FP32")
        request.set_data_from_numpy(rows)
        answer = client.infer(name, [request], model_version=str(number))
        served = answer.as_numpy(metadata.outputs[0].name)
    finally:
        client.close()
    np.testing.assert_allclose(served, expected, rtol=1e-5, atol=1e-6)


async def test_it_trains_on_digits_uploaded_by_a_plain_s3_client(stack, servers):
    digits = load_builtin("digits")
    buffer = io.BytesIO()
    np.savez(buffer, X=digits.x_train, y=digits.y_train)
    data, key = buffer.getvalue(), f"plain/{uuid.uuid4().hex[:8]}.npz"
    store = ObjectStore(stack.settings)
    store.client.put_object(DATASETS_BUCKET, key, io.BytesIO(data), len(data))  # no metadata
    doc = jobs.load_job_file(EXAMPLE)
    doc["dataset"] = {"uri": f"s3://{DATASETS_BUCKET}/{key}", "task": "classification"}
    final = await train(stack.settings, doc, 20)
    assert final.state == "succeeded", final.error
    assert store.exists(DATASETS_BUCKET, key + datasets.SIDECAR_SUFFIX)
