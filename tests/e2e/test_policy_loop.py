"""The closed loop with no CLI step: a model with a policy, a train job from a plain Kafka
producer, and the platform compresses the result, promotes a variant by the policy's rule (the
reason and the actor in the alias history) and serves it over gRPC."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import tritonclient.grpc as triton

# The stack and the plain producer of the platform test, not its tests.
from test_platform import a_job, final_status, platform, publish_plain_json, settings

from maas.config import Settings
from maas.datasets import load_builtin
from maas.edge import call_metadata
from maas.policy import ACTOR, policy_job_id
from maas.registry import AliasChange, RegistryClient

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]
__all__ = ["platform", "settings"]  # fixtures used by name

MODEL = "e2e-policy-digits"
POLICY = {
    "on_registered": {"compress": {"methods": [{"quantize": {"dtype": "int8"}}]}},
    "promote": {
        "alias": "production",
        "rule": "smallest_within",
        "within": 0.05,
        "require": {"accuracy": 0.8},
    },
}
WAIT_S = 300.0


async def promotion(registry: RegistryClient) -> AliasChange:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        moves = await registry.alias_history(MODEL, "production")
        if moves:
            return moves[-1]
        await asyncio.sleep(0.5)
    raise AssertionError(f"{MODEL}@production never moved")


def served_version(settings: Settings, rows: np.ndarray, want: str) -> str:
    """The version the bare name answers with, once it is ``want`` (the swap is asynchronous)."""
    client = triton.InferenceServerClient(settings.inference_addr)
    headers = dict(call_metadata(settings))
    deadline, seen = time.monotonic() + 60, ""
    try:
        while time.monotonic() < deadline and seen != want:
            metadata = client.get_model_metadata(MODEL, headers=headers)
            inputs = [triton.InferInput(metadata.inputs[0].name, list(rows.shape), "FP32")]
            inputs[0].set_data_from_numpy(rows)
            answer = client.infer(MODEL, inputs, headers=headers)
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
        await registry.set_policy(MODEL, POLICY)
    job = a_job(
        "train",
        model={"name": MODEL, "arch": "mlp", "config": {"hidden": [32]}},
        dataset={"uri": "builtin:digits"},
        training={
            "steps": 60,
            "batch_size": 32,
            "workers": 1,
            "shards": 1,
            "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        },
        register_as={"name": MODEL},
    )
    await publish_plain_json(settings, job)
    trained = await final_status(settings, job["job_id"])
    assert trained.state == "succeeded", trained.error
    parent = trained.model["version"]
    plan = await final_status(settings, policy_job_id(MODEL, parent))
    assert plan.state == "succeeded", plan.error
    (variant,) = plan.models
    async with RegistryClient(settings) as registry:
        move = await promotion(registry)
        promoted = await registry.get(f"{MODEL}@production")
    assert (move.from_version, move.to_version) == (None, variant["version"])
    assert promoted.method == "quantize" and str(promoted.parent) == f"{MODEL}@{parent}"
    assert move.reason.startswith(f"{ACTOR} (policy v1): smallest within 5.0 points of v{parent}")
    assert move.actor  # the compressor's token identity
    rows = load_builtin("digits").x_test[:4].astype(np.float32)
    seen = await asyncio.to_thread(served_version, settings, rows, str(variant["version"]))
    assert seen == str(variant["version"])
