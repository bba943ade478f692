"""The OIP HTTP/REST side of the real inference process, driven by the unmodified
tritonclient.http and by plain HTTP requests (urllib), serving versions from the real registry
(real Kafka, real S3), with auth on: a read token from this file's token table.

The model here was registered by a training-like step that set only ``staging``: a request with
no version must still find it (the registry's bare-name resolution), over HTTP and gRPC alike.
"""

from __future__ import annotations

import hashlib
import json
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from infra.harness.serving import ServiceProcesses
from maas import zoo
from maas.registry import RegistryClient

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

MLP = {"in_features": 16, "hidden": [32], "num_classes": 4}
TOKEN = "oip-http-read-token"


def auth() -> dict[str, str]:
    # A fresh dict per call: tritonclient.http adds its own headers to the one it is given.
    # Lowercase: gRPC refuses upper-case metadata keys; HTTP ignores case.
    return {"authorization": f"Bearer {TOKEN}"}


X = np.random.default_rng(3).standard_normal((3, 16)).astype(np.float32)


@dataclass
class Served:
    http: str
    grpc: str
    name: str
    module: torch.nn.Module

    def expected(self, x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.module(torch.from_numpy(x)).numpy()


@pytest.fixture(scope="module")
def processes(stack, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("oip-http")
    table = workdir / "tokens.json"
    entry = {
        "identity": "oip-http",
        "role": "read",
        "sha256": hashlib.sha256(TOKEN.encode()).hexdigest(),
    }
    table.write_text(json.dumps({"format": "maas.tokens/1", "tokens": [entry]}))
    with ServiceProcesses(workdir) as procs:
        registry = procs.start_registry()
        grpc_addr = procs.start_inference(
            "inference-http", registry, MAAS_AUTH_TOKENS_FILE=str(table)
        )
        yield procs, registry, grpc_addr


@pytest.fixture(scope="module")
async def served(stack, processes) -> Served:
    procs, registry_addr, grpc_addr = processes
    name = f"http-mlp-{uuid.uuid4().hex[:8]}"
    module = zoo.build("mlp", MLP, seed=5).eval()
    settings = stack.settings.replace(registry_addr=registry_addr)
    async with RegistryClient(settings, actor="test-oip-http") as client:
        await client.register(module, name, "mlp", MLP, alias="staging")
    return Served(procs.http_addr("inference-http"), grpc_addr, name, module)


def http_client(served: Served) -> triton_http.InferenceServerClient:
    return triton_http.InferenceServerClient(url=served.http)


def request(
    served: Served, method: str, path: str, body: dict | None = None, with_token: bool = True
):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://{served.http}{path}", data=data, method=method)
    if with_token:
        for key, value in auth().items():
            req.add_header(key, value)
    try:
        with urllib.request.urlopen(req, timeout=30) as reply:
            return reply.status, json.loads(reply.read() or b"{}")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


# --- tritonclient.http ------------------------------------------------------------------------


def test_health_and_a_bare_name_with_only_staging_are_ready(served):
    client = http_client(served)
    assert client.is_server_live(headers=auth()) and client.is_server_ready(headers=auth())
    assert client.is_model_ready(served.name, headers=auth())
    grpc_client = triton_grpc.InferenceServerClient(url=served.grpc)
    assert grpc_client.is_model_ready(served.name, headers=auth())


def test_tritonclient_http_infers_with_binary_tensors(served):
    tensor = triton_http.InferInput("input", list(X.shape), "FP32")
    tensor.set_data_from_numpy(X, binary_data=True)
    result = http_client(served).infer(served.name, [tensor], headers=auth())
    np.testing.assert_allclose(result.as_numpy("output"), served.expected(X), rtol=1e-5, atol=1e-6)
    assert result.get_response()["model_version"] == "1"


def test_tritonclient_http_infers_with_json_tensors(served):
    tensor = triton_http.InferInput("input", list(X.shape), "FP32")
    tensor.set_data_from_numpy(X, binary_data=False)
    output = triton_http.InferRequestedOutput("output", binary_data=False)
    result = http_client(served).infer(served.name, [tensor], outputs=[output], headers=auth())
    np.testing.assert_allclose(result.as_numpy("output"), served.expected(X), rtol=1e-5, atol=1e-6)


def test_tritonclient_http_reads_metadata_config_statistics_and_the_index(served):
    client = http_client(served)
    meta = client.get_model_metadata(served.name, headers=auth())
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 16]}]
    config = client.get_model_config(served.name, headers=auth())
    assert (config["name"], config["input"][0]["dims"]) == (served.name, [16])
    assert config["max_batch_size"] == 64
    stats = client.get_inference_statistics(served.name, headers=auth())
    assert stats["model_stats"][0]["name"] == served.name
    index = client.get_model_repository_index(headers=auth())
    assert (served.name, "1", "READY") in [(m["name"], m["version"], m["state"]) for m in index]


def test_tritonclient_http_reports_an_unknown_model(served):
    tensor = triton_http.InferInput("input", list(X.shape), "FP32")
    tensor.set_data_from_numpy(X)
    with pytest.raises(InferenceServerException, match="no-such-model"):
        http_client(served).infer("no-such-model", [tensor], headers=auth())


# --- tritonclient.grpc: the model-management surface --------------------------------------


def test_tritonclient_grpc_reads_config_statistics_and_the_index(served):
    client = triton_grpc.InferenceServerClient(url=served.grpc)
    config = client.get_model_config(served.name, headers=auth(), as_json=True)["config"]
    assert (config["name"], config["max_batch_size"]) == (served.name, 64)
    assert config["input"][0]["data_type"] == "TYPE_FP32"
    tensor = triton_grpc.InferInput("input", list(X.shape), "FP32")
    tensor.set_data_from_numpy(X)
    client.infer(served.name, [tensor], headers=auth())
    stats = client.get_inference_statistics(served.name, headers=auth(), as_json=True)
    (entry,) = stats["model_stats"]
    assert int(entry["inference_count"]) >= 3
    index = client.get_model_repository_index(headers=auth(), as_json=True)
    assert served.name in [m["name"] for m in index["models"]]


# --- plain HTTP ---------------------------------------------------------------------------


def test_plain_json_infer_answers_and_errors_say_what_is_wrong(served):
    tensor = {"name": "input", "datatype": "FP32", "shape": [3, 16], "data": X.tolist()}
    status, reply = request(served, "POST", f"/v2/models/{served.name}/infer", {"inputs": [tensor]})
    assert status == 200
    out = np.array(reply["outputs"][0]["data"], np.float32).reshape(3, 4)
    np.testing.assert_allclose(out, served.expected(X), rtol=1e-5, atol=1e-6)
    tensor["shape"] = [3, 8]
    status, reply = request(served, "POST", f"/v2/models/{served.name}/infer", {"inputs": [tensor]})
    assert status == 400 and "needs 24" in reply["error"]


def test_plain_requests_need_the_token_except_health(served):
    assert request(served, "GET", "/v2/health/ready", with_token=False)[0] == 200
    status, reply = request(served, "GET", f"/v2/models/{served.name}", with_token=False)
    assert status == 401 and "authorization" in reply["error"]
    status, reply = request(served, "POST", f"/v2/repository/models/{served.name}/unload")
    assert status == 403
