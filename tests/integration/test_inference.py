"""The inference server as clients see it: the real process, driven by the unmodified
tritonclient.grpc, serving versions from the real registry (real Kafka, real S3).

Two servers run: one with dynamic batching and auth switched off explicitly (MAAS_AUTH=off),
one without batching whose token table holds this file's read token.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from infra.harness.serving import ServiceProcesses, kserve_python
from maas import zoo
from maas.registry import RegistryClient

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

MLP = {"in_features": 64, "hidden": [128, 64], "num_classes": 10}
TOKEN = "integration-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
LIMIT_BYTES = 48 * 1024 * 1024


@dataclass
class Servers:
    processes: ServiceProcesses
    registry_addr: str
    batched: str
    unbatched: str  # also requires the token


@pytest.fixture(scope="module")
def servers(stack, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("inference")
    table = workdir / "tokens.json"
    digest = hashlib.sha256(TOKEN.encode()).hexdigest()
    entry = {"identity": "integration", "role": "read", "sha256": digest}
    table.write_text(json.dumps({"format": "maas.tokens/1", "tokens": [entry]}))
    with ServiceProcesses(workdir) as processes:
        registry = processes.start_registry()
        batched = processes.start_inference(
            "inference-batched",
            registry,
            MAAS_AUTH="off",
            MAAS_INFERENCE_MAX_BATCH_SIZE="64",
            MAAS_INFERENCE_MAX_QUEUE_DELAY_US="5000",
            MAAS_GRPC_MAX_MESSAGE_BYTES=str(LIMIT_BYTES),
        )
        unbatched = processes.start_inference(
            "inference-unbatched",
            registry,
            MAAS_INFERENCE_MAX_BATCH_SIZE="1",
            MAAS_AUTH_TOKENS_FILE=str(table),
            MAAS_GRPC_MAX_MESSAGE_BYTES=str(LIMIT_BYTES),
        )
        yield Servers(processes, registry, batched, unbatched)


@pytest.fixture(scope="module")
async def registry(stack, servers):
    async with RegistryClient(
        stack.settings.replace(registry_addr=servers.registry_addr), actor="test-inference"
    ) as client:
        yield client


@dataclass
class Registered:
    name: str
    modules: dict[int, torch.nn.Module]  # version -> the module as registered

    def forward(self, version: int, x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.modules[version](torch.from_numpy(x)).numpy()


async def register_versions(registry, seeds, alias_first="production") -> Registered:
    name = f"it-mlp-{uuid.uuid4().hex[:8]}"
    modules = {}
    for i, seed in enumerate(seeds):
        module = zoo.build("mlp", MLP, seed=seed).eval()
        version = await registry.register(
            module, name, "mlp", MLP, alias=alias_first if i == 0 else None
        )
        modules[version.version] = module
    return Registered(name, modules)


@pytest.fixture(scope="module")
async def digits(registry) -> Registered:
    return await register_versions(registry, seeds=[11, 12])


def client(addr: str) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(url=addr)


def rows(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 64)).astype(np.float32)


def infer(addr, name, x, *, version="", headers=None, datatype="FP32"):
    tensor = triton.InferInput("input", list(x.shape), datatype)
    tensor.set_data_from_numpy(x)
    return client(addr).infer(name, [tensor], model_version=version, headers=headers)


def assert_same(actual: np.ndarray, expected: np.ndarray) -> None:
    # Equal to float32 rounding: the BLAS kernel (and so the last bits) depends on the batch.
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(actual.argmax(axis=1), expected.argmax(axis=1))


def failure(call) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value


# --- health and metadata --------------------------------------------------------------------


def test_the_server_is_live_and_ready(servers):
    c = client(servers.batched)
    assert c.is_server_live()
    assert c.is_server_ready()


def test_models_are_ready_by_name_version_or_alias_and_unknown_ones_are_not(servers, digits):
    c = client(servers.batched)
    assert c.is_model_ready(digits.name)
    assert c.is_model_ready(digits.name, "2")
    assert c.is_model_ready(digits.name, "production")
    assert not c.is_model_ready("no-such-model")
    assert not c.is_model_ready(digits.name, "99")


def test_model_metadata_lists_inputs_and_outputs_with_datatypes_and_shapes(servers, digits):
    meta = client(servers.batched).get_model_metadata(digits.name, as_json=True)
    assert meta["name"] == digits.name
    assert meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "64"]}]
    assert meta["outputs"] == [{"name": "output", "datatype": "FP32", "shape": ["-1", "10"]}]


# --- inference ------------------------------------------------------------------------------


def test_raw_inputs_give_the_registered_versions_own_outputs(servers, digits):
    x = rows(5, seed=1)
    result = infer(servers.batched, digits.name, x)
    assert result.get_response().model_version == "1"
    assert_same(result.as_numpy("output"), digits.forward(1, x))
    pinned = infer(servers.batched, digits.name, x, version="2")
    assert pinned.get_response().model_version == "2"
    assert_same(pinned.as_numpy("output"), digits.forward(2, x))


def test_typed_contents_are_accepted_and_answered_with_raw_outputs(servers, digits):
    x = rows(3, seed=2)
    request = service_pb2.ModelInferRequest(model_name=digits.name, id="typed-1")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=[3, 64])
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    with grpc.insecure_channel(servers.batched) as channel:
        reply = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    assert reply.id == "typed-1" and reply.model_version == "1"
    (out,) = reply.outputs
    assert (out.name, out.datatype, list(out.shape)) == ("output", "FP32", [3, 10])
    got = np.frombuffer(reply.raw_output_contents[0], "<f4").reshape(3, 10)
    assert_same(got, digits.forward(1, x))


def test_batched_and_unbatched_servers_give_the_same_answers(servers, digits):
    inputs = [rows(1 + i % 4, seed=100 + i) for i in range(48)]

    def ask(addr, headers):
        with ThreadPoolExecutor(max_workers=16) as pool:
            results = pool.map(lambda x: infer(addr, digits.name, x, headers=headers), inputs)
            return [r.as_numpy("output") for r in results]

    batched = ask(servers.batched, None)
    unbatched = ask(servers.unbatched, AUTH)
    for x, b, u in zip(inputs, batched, unbatched, strict=True):
        assert_same(b, u)
        assert_same(b, digits.forward(1, x))
    stats = client(servers.batched).get_inference_statistics(digits.name, "1", as_json=True)
    (model,) = stats["model_stats"]
    assert int(model["execution_count"]) < int(model["inference_stats"]["success"]["count"])


def test_a_32_mb_tensor_goes_through(servers, digits):
    x = rows(32 * 1024 * 1024 // (64 * 4), seed=3)
    assert x.nbytes == 32 * 1024 * 1024
    result = infer(servers.batched, digits.name, x)
    out = result.as_numpy("output")
    assert out.shape == (len(x), 10)
    assert_same(out, digits.forward(1, x))


# --- errors ---------------------------------------------------------------------------------


def test_an_unknown_model_is_not_found_with_its_name_in_the_message(servers):
    error = failure(lambda: infer(servers.batched, "no-such-model", rows(1)))
    assert error.status() == "StatusCode.NOT_FOUND"
    assert "no-such-model" in error.message()


def test_an_unknown_version_or_alias_is_not_found(servers, digits):
    error = failure(lambda: infer(servers.batched, digits.name, rows(1), version="99"))
    assert error.status() == "StatusCode.NOT_FOUND" and "99" in error.message()
    error = failure(lambda: infer(servers.batched, digits.name, rows(1), version="canary"))
    assert error.status() == "StatusCode.NOT_FOUND" and "canary" in error.message()


def test_a_wrong_datatype_is_invalid_and_the_message_names_the_expected_one(servers, digits):
    error = failure(
        lambda: infer(servers.batched, digits.name, rows(2).astype(np.float64), datatype="FP64")
    )
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert "FP64" in error.message() and "expects FP32 with shape [-1, 64]" in error.message()


def test_a_wrong_shape_is_invalid_and_the_message_names_the_expected_one(servers, digits):
    error = failure(lambda: infer(servers.batched, digits.name, rows(2)[:, :16]))
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert "[2, 16]" in error.message() and "[-1, 64]" in error.message()


def test_a_request_over_the_message_limit_is_resource_exhausted(servers, digits):
    x = np.zeros((LIMIT_BYTES // 256 + 1024, 64), np.float32)
    error = failure(lambda: infer(servers.batched, digits.name, x))
    assert error.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert error.message()


def test_without_the_token_calls_are_unauthenticated(servers, digits):
    error = failure(lambda: infer(servers.unbatched, digits.name, rows(1)))
    assert error.status() == "StatusCode.UNAUTHENTICATED"
    assert "authorization" in error.message()
    wrong = {"authorization": "Bearer nope"}
    error = failure(lambda: infer(servers.unbatched, digits.name, rows(1), headers=wrong))
    assert error.status() == "StatusCode.UNAUTHENTICATED"
    assert infer(servers.unbatched, digits.name, rows(1), headers=AUTH).as_numpy(
        "output"
    ).shape == (1, 10)


def test_metrics_count_requests_by_code_and_describe_batches_and_models(servers, digits):
    infer(servers.batched, digits.name, rows(2))
    with pytest.raises(InferenceServerException):
        infer(servers.batched, "no-such-model", rows(1))
    port = servers.processes.metrics_port("inference-batched")
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert 'maas_inference_requests_total{code="OK",method="ModelInfer"}' in text
    assert 'maas_inference_requests_total{code="NOT_FOUND",method="ModelInfer"}' in text
    assert "maas_inference_request_seconds_bucket" in text
    assert f'maas_inference_batch_rows_bucket{{le="1.0",model="{digits.name}"' in text
    assert f'maas_inference_queue_rows{{model="{digits.name}"' in text
    assert "maas_inference_loaded_models " in text


# --- hot swap -------------------------------------------------------------------------------


@dataclass
class Answer:
    client: int
    started: float
    finished: float
    version: int | None
    correct: bool
    error: str = ""


async def test_promoting_a_version_under_load_swaps_with_no_failed_request(servers, registry):
    model = await register_versions(registry, seeds=[21, 22])
    x = rows(2, seed=4)
    expected = {v: model.forward(v, x) for v in model.modules}
    answers: list[Answer] = []
    stop = threading.Event()

    def keep_asking(i: int) -> None:
        c = client(servers.batched)
        tensor = triton.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        while not stop.is_set():
            started = time.monotonic()
            try:
                result = c.infer(model.name, [tensor])
            except InferenceServerException as exc:
                answers.append(Answer(i, started, time.monotonic(), None, False, str(exc)))
                continue
            version = int(result.get_response().model_version)
            correct = np.allclose(
                result.as_numpy("output"), expected[version], rtol=1e-5, atol=1e-6
            )
            answers.append(Answer(i, started, time.monotonic(), version, correct))

    clients = [threading.Thread(target=keep_asking, args=(i,)) for i in range(3)]
    for t in clients:
        t.start()
    try:
        await wait_for(lambda: sum(a.version == 1 for a in answers) >= 30)
        await registry.set_alias(model.name, "production", 2)
        await wait_for(
            lambda: all(
                sum(a.version == 2 and a.client == i for a in answers) >= 20 for i in range(3)
            )
        )
    finally:
        stop.set()
        for t in clients:
            t.join(timeout=30)

    assert [a for a in answers if not a.correct] == []
    first_new = min(a.finished for a in answers if a.version == 2)
    after = [a for a in answers if a.started > first_new]
    assert after and all(a.version == 2 for a in after)
    assert {a.version for a in answers} == {1, 2}


async def wait_for(condition, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


# --- CLI ------------------------------------------------------------------------------------


def test_maas_predict_prints_the_served_versions_answer(servers, digits, tmp_path):
    x = rows(2, seed=5)
    np.save(tmp_path / "x.npy", x)
    env = {**os.environ, "MAAS_INFERENCE_ADDR": servers.unbatched, "MAAS_AUTH_TOKEN": TOKEN}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "maas.cli",
            "predict",
            f"{digits.name}@2",
            "--input",
            str(tmp_path / "x.npy"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    answer = json.loads(done.stdout)
    assert (answer["model"], answer["version"]) == (digits.name, 2)
    assert_same(np.array(answer["outputs"]["output"]["data"], np.float32), digits.forward(2, x))
    assert answer["argmax"] == digits.forward(2, x).argmax(axis=1).tolist()


def test_maas_predict_reports_a_server_error_and_exits_nonzero(servers):
    env = {**os.environ, "MAAS_INFERENCE_ADDR": servers.batched}
    done = subprocess.run(
        [sys.executable, "-m", "maas.cli", "predict", "no-such-model", "--input", "[1, 2]"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert "NotFound" in done.stderr and "no-such-model" in done.stderr


# --- KServe's client ------------------------------------------------------------------------

# Runs in KServe's own venv (built once, cached): its generated protos and tritonclient's cannot
# share a process.
KSERVE_CLIENT = Path(__file__).with_name("kserve_client_probe.py")


@pytest.fixture(scope="module")
def kserve() -> Path:
    return kserve_python()  # builds ~/.cache/maas/venv-kserve-<version> on first use


async def test_kserves_own_grpc_client_finds_a_bare_name_set_only_to_staging(
    servers, registry, kserve
):
    # What a training job leaves behind: one version, alias staging, no production.
    staged = await register_versions(registry, seeds=[31], alias_first="staging")
    x = rows(3, seed=6)
    done = subprocess.run(
        [str(kserve), str(KSERVE_CLIENT), servers.batched, staged.name, json.dumps(x.tolist())],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["ready"] is True
    assert (answer["id"], answer["version"]) == ("kserve-1", "1")
    assert_same(np.array(answer["output"], np.float32), staged.forward(1, x))
