"""MiniLM end to end on the real stack: `maas models import` from the installed package into the
real registry (Kafka + S3), the shared loader rebuilding it, and the real inference server
answering unmodified tritonclient BYTES requests with the in-process model's embeddings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from infra.harness.serving import ServiceProcesses, kserve_python
from maas.registry import RegistryClient
from maas.text.model import TextModel
from maas.text.pretrained import MINILM_PACKAGE, MINILM_WEIGHTS_SHA256, read_package
from maas.text.tokenizer import TextTokenizer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

TEXTS = ["Hello world", "", "A longer sentence, about serving text models over gRPC.", "w " * 300]


@dataclass
class Served:
    registry_addr: str
    inference_addr: str
    name: str
    env: dict[str, str]


@pytest.fixture(scope="module")
def served(stack, tmp_path_factory) -> Served:
    workdir = tmp_path_factory.mktemp("text")
    with ServiceProcesses(workdir) as processes:
        registry = processes.start_registry()
        inference = processes.start_inference(
            "inference-text",
            registry,
            MAAS_AUTH="off",
            MAAS_INFERENCE_MAX_BATCH_SIZE="32",
            MAAS_INFERENCE_MAX_QUEUE_DELAY_US="20000",
        )
        name = f"it-minilm-{uuid.uuid4().hex[:8]}"
        env = {**os.environ, "MAAS_REGISTRY_ADDR": registry, "MAAS_INFERENCE_ADDR": inference}
        command = [sys.executable, "-m", "maas.cli", "models", "import", MINILM_PACKAGE]
        subprocess.run(
            [*command, "--name", name, "--alias", "production"],
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
            check=True,
        )
        yield Served(registry, inference, name, env)


@pytest.fixture(scope="module")
def minilm() -> TextModel:
    return TextModel.from_pretrained(read_package(MINILM_PACKAGE))


@pytest.fixture(scope="module")
async def registry(stack, served):
    async with RegistryClient(stack.settings.replace(registry_addr=served.registry_addr)) as client:
        yield client


def embed(addr: str, name: str, texts: list[str], version: str = "") -> np.ndarray:
    tensor = triton.InferInput("text", [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array(texts, dtype=np.object_))
    result = triton.InferenceServerClient(url=addr).infer(name, [tensor], model_version=version)
    return result.as_numpy("embedding")


async def test_the_imported_version_records_its_source_and_every_files_sha256(
    registry, served
) -> None:
    version = await registry.get(f"{served.name}@production")
    manifest = version.manifest()
    assert (version.arch, manifest["method"]) == ("bert", "import")
    assert manifest["settings"]["source"] == f"package {MINILM_PACKAGE}==0.1.0"
    assert manifest["settings"]["source_sha256"]["model.safetensors"] == MINILM_WEIGHTS_SHA256
    assert {"weights.safetensors", "tokenizer.json", "vocab.txt"} <= {f.name for f in version.files}
    assert manifest["config"]["layers"] == 6 and manifest["config"]["hidden"] == 384


async def test_the_shared_loader_rebuilds_the_encoder(registry, served, minilm) -> None:
    _, manifest, files = await registry.fetch(f"{served.name}@production")
    loaded = TextModel.from_artifact(manifest, files)
    np.testing.assert_allclose(loaded(TEXTS), minilm(TEXTS), atol=1e-6, rtol=0)
    module = await registry.load(f"{served.name}@production")
    tokenizer = TextTokenizer.from_files(files, max_length=256)
    ids = tokenizer.encode(TEXTS)
    np.testing.assert_allclose(
        TextModel(module, tokenizer, loaded.config).run_ids(ids), minilm(TEXTS), atol=1e-6, rtol=0
    )


def test_tritonclient_bytes_get_the_in_process_embedding(served, minilm) -> None:
    np.testing.assert_allclose(
        embed(served.inference_addr, served.name, TEXTS), minilm(TEXTS), atol=1e-5, rtol=0
    )


# KServe's client runs in KServe's own venv (built once, cached; its protos and tritonclient's
# cannot share a process). It sends the texts twice: as raw length-prefixed BYTES
# (binary_data=True) and as bytes_contents (binary_data=False).
KSERVE_TEXT_CLIENT = """
import asyncio, json, sys
import numpy as np
from kserve import InferenceGRPCClient, InferInput, InferRequest

async def main(addr, name, texts):
    texts = np.array(json.loads(texts), dtype=np.object_)
    answers = []
    async with InferenceGRPCClient(url=addr) as client:
        for binary in (True, False):
            tensor = InferInput(name="text", shape=list(texts.shape), datatype="BYTES")
            tensor.set_data_from_numpy(texts, binary_data=binary)
            answer = await client.infer(InferRequest(model_name=name, infer_inputs=[tensor]))
            answers.append(answer.outputs[0].as_numpy().tolist())
    print(json.dumps(answers))

asyncio.run(main(*sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def kserve() -> Path:
    return kserve_python()  # builds ~/.cache/maas/venv-kserve-<version> on first use


def test_kserves_own_client_bytes_get_the_in_process_embedding(served, minilm, kserve) -> None:
    texts = TEXTS[:3]
    done = subprocess.run(
        [
            str(kserve),
            "-c",
            KSERVE_TEXT_CLIENT,
            served.inference_addr,
            served.name,
            json.dumps(texts),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    raw, contents = json.loads(done.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(np.array(raw, np.float32), minilm(texts), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.array(contents, np.float32), minilm(texts), atol=1e-5, rtol=0)


def test_model_metadata_advertises_bytes_in_and_embeddings_out(served) -> None:
    client = triton.InferenceServerClient(url=served.inference_addr)
    meta = client.get_model_metadata(served.name, as_json=True)
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": ["-1"]}]
    assert meta["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": ["-1", "384"]}]


def test_concurrent_mixed_length_requests_equal_each_alone(served, minilm) -> None:
    from concurrent.futures import ThreadPoolExecutor

    texts = [TEXTS[i % len(TEXTS)] + f" {i}" for i in range(24)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda t: embed(served.inference_addr, served.name, [t]), texts))
    for text, answer in zip(texts, answers, strict=True):
        np.testing.assert_allclose(answer, minilm([text]), atol=1e-5, rtol=0)


def test_bytes_contents_are_accepted(served, minilm) -> None:
    request = service_pb2.ModelInferRequest(model_name=served.name)
    tensor = request.inputs.add(name="text", datatype="BYTES", shape=[2])
    tensor.contents.bytes_contents.extend([t.encode() for t in TEXTS[:2]])
    with grpc.insecure_channel(served.inference_addr) as channel:
        reply = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
    got = np.frombuffer(reply.raw_output_contents[0], "<f4").reshape(2, 384)
    np.testing.assert_allclose(got, minilm(TEXTS[:2]), atol=1e-5, rtol=0)


def test_invalid_utf8_is_invalid_argument(served) -> None:
    tensor = triton.InferInput("text", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([b"\xff\xfe"], dtype=np.object_))
    with pytest.raises(InferenceServerException) as info:
        triton.InferenceServerClient(url=served.inference_addr).infer(served.name, [tensor])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "UTF-8" in info.value.message()


def test_an_oversize_batch_is_invalid_argument(served) -> None:
    with pytest.raises(InferenceServerException) as info:
        embed(served.inference_addr, served.name, ["x"] * 257)
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"


def test_maas_predict_text_prints_the_embedding(served, minilm) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "maas.cli", "predict", served.name, "--text", TEXTS[0]],
        env=served.env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    answer = json.loads(done.stdout)
    got = np.array(answer["outputs"]["embedding"]["data"], np.float32)
    np.testing.assert_allclose(got, minilm(TEXTS[:1]), atol=1e-5, rtol=0)
