"""Hypothesis-generated ModelInfer requests against the real inference gRPC server (the edge with
auth on, the dataplane, the batcher; versions from an in-memory source): every answer is OK or
a status that names the caller's mistake — never INTERNAL or UNKNOWN — and a valid request is
still answered correctly afterwards.

MAAS_FUZZ_INFER_REQUESTS sets the count (CI: 500; the issue's figure: 2000).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from maas import zoo
from maas.config import Settings
from maas.oip import grpc_predict_v2_pb2 as pb
from maas.oip import grpc_predict_v2_pb2_grpc as pb_grpc
from services.inference.batcher import BatchingConfig
from services.inference.dataplane import DataPlane
from services.inference.metrics import Metrics
from services.inference.server import build_grpc_server
from services.inference.sources import MemorySource

pytestmark = pytest.mark.timeout(900)

REQUESTS = int(os.environ.get("MAAS_FUZZ_INFER_REQUESTS", "500"))
MLP = {"in_features": 4, "hidden": [8], "num_classes": 3}
TOKEN = "fuzz-read-token"
LIMIT = 256 * 1024
ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
}
DATATYPES = ["FP32", "FP64", "FP16", "INT64", "INT32", "INT8", "UINT8", "BOOL", "BYTES", ""]
TYPED = ["fp32_contents", "fp64_contents", "int_contents", "int64_contents", "bool_contents"]


class Server:
    """The real gRPC server on its own event loop thread."""

    def __init__(self, tokens_file: str) -> None:
        self.module = zoo.build("mlp", MLP, seed=4).eval()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(tokens_file), self._loop).result()

    async def _start(self, tokens_file: str) -> int:
        source = MemorySource()
        source.add("digits", self.module, "mlp", MLP, aliases=["production"])
        source.add("digits", zoo.build("mlp", MLP, seed=5).eval(), "mlp", MLP, aliases=["staging"])
        self._pool = ThreadPoolExecutor(max_workers=2)
        metrics = Metrics()
        self.plane = DataPlane(
            source,
            self._pool,
            batching=BatchingConfig(8, 0),
            cache_bytes=1 << 30,
            metrics=metrics,
            inline_forward_us=500,
        )
        self.plane.ready = True
        options = Settings().replace(
            auth=True, auth_tokens_file=tokens_file, grpc_max_message_bytes=LIMIT
        )
        self._server = build_grpc_server(options, self.plane, metrics, health.aio.HealthServicer())
        port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        return port

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._server.stop(0), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._pool.shutdown()


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    table = tmp_path_factory.mktemp("fuzz-infer") / "tokens.json"
    entry = {"identity": "f", "role": "read", "sha256": hashlib.sha256(TOKEN.encode()).hexdigest()}
    table.write_text(json.dumps({"format": "maas.tokens/1", "tokens": [entry]}))
    running = Server(str(table))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def stub(server) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


# --- strategies ---------------------------------------------------------------------------------

texts = st.text(max_size=20)
dims = st.sampled_from([-1, 0, 1, 2, 3, 4, 2**31, 2**62]) | st.integers(-(2**63), 2**63 - 1)


@st.composite
def tensors(draw: st.DrawFn) -> pb.ModelInferRequest.InferInputTensor:
    tensor = pb.ModelInferRequest.InferInputTensor(
        name=draw(st.sampled_from(["input", "", "pixels"]) | texts),
        datatype=draw(st.sampled_from(DATATYPES) | texts),
        shape=draw(
            st.sampled_from([[1, 4], [2, 4], [4], [0, 4], [1, 3]]) | st.lists(dims, max_size=4)
        ),
    )
    if draw(st.booleans()):
        field = draw(st.sampled_from(TYPED))
        values = draw(st.lists(st.integers(-(2**31), 2**31 - 1), max_size=12))
        if field == "bool_contents":
            getattr(tensor.contents, field).extend(bool(v) for v in values)
        elif field in ("fp32_contents", "fp64_contents"):
            getattr(tensor.contents, field).extend(float(v) for v in values)
        else:
            getattr(tensor.contents, field).extend(values)
    if draw(st.booleans()):
        tensor.parameters["binary_data_size"].int64_param = draw(st.integers(-5, 64))
    return tensor


@st.composite
def requests(draw: st.DrawFn) -> tuple[pb.ModelInferRequest, list[tuple[str, str]]]:
    request = pb.ModelInferRequest(
        model_name=draw(st.sampled_from(["digits", "", "nope", "x" * 300]) | texts),
        model_version=draw(
            st.sampled_from(["", "1", "2", "9", "99999999999999999999999", "staging", " 1 "])
            | texts
        ),
        id=draw(texts),
        inputs=draw(st.lists(tensors(), max_size=3)),
    )
    raws = draw(
        st.lists(
            st.sampled_from([np.ones((1, 4), np.float32).tobytes(), b"", b"\0" * 33])
            | st.binary(max_size=64),
            max_size=3,
        )
    )
    request.raw_input_contents.extend(raws)
    if draw(st.booleans()):
        request.outputs.add(name=draw(st.sampled_from(["output", ""]) | texts))
    if draw(st.integers(0, 9)) == 0:  # a message over the server's limit
        request.raw_input_contents.append(bytes(LIMIT + 1))
    token = draw(st.sampled_from([TOKEN, TOKEN, TOKEN, "", "wrong"]))
    metadata = [("authorization", f"Bearer {token}")] if token else []
    return request, metadata


def valid(x: np.ndarray) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="digits")
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    return request


def code_of(stub, request, metadata) -> grpc.StatusCode:
    try:
        stub.ModelInfer(request, metadata=metadata, timeout=30)
    except grpc.RpcError as error:
        return error.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


# --- the property --------------------------------------------------------------------------------


def test_fuzzed_requests_get_only_the_callers_mistakes_and_valid_ones_still_work(stub, server):
    seen: dict[grpc.StatusCode, int] = {}

    @settings(
        max_examples=REQUESTS,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(requests())
    def one(case: tuple[pb.ModelInferRequest, list[tuple[str, str]]]) -> None:
        code = code_of(stub, *case)
        seen[code] = seen.get(code, 0) + 1
        assert code in ALLOWED, (code, case[0])

    one()
    assert sum(seen.values()) >= REQUESTS * 0.9
    assert grpc.StatusCode.INVALID_ARGUMENT in seen and grpc.StatusCode.UNAUTHENTICATED in seen
    x = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
    reply = stub.ModelInfer(valid(x), metadata=[("authorization", f"Bearer {TOKEN}")], timeout=30)
    out = np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(2, 3)
    with torch.inference_mode():
        np.testing.assert_allclose(out, server.module(torch.from_numpy(x)).numpy(), rtol=1e-5)
