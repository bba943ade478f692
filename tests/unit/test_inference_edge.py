"""The gRPC edge, in process: OIP messages, status codes with messages, auth, metrics.

Driven with this repository's own OIP stubs; tritonclient drives the real server process in the
integration tests.
"""

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch
from dataplane_kit import make_plane
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from maas import zoo
from maas.config import Settings
from maas.oip import grpc_predict_v2_pb2 as pb
from maas.oip import grpc_predict_v2_pb2_grpc as pb_grpc
from services.inference.metrics import Metrics
from services.inference.server import build_grpc_server
from services.inference.sources import MemorySource

MLP = {"in_features": 64, "hidden": [32], "num_classes": 10}
LIMIT = 1024 * 1024
TOKEN = "s3cret"


class BrokenSource(MemorySource):
    async def fetch(self, name, version):
        if name == "broken":
            raise RuntimeError("disk on fire")
        return await super().fetch(name, version)

    async def resolve(self, name, alias):
        if name == "broken":
            return 1
        return await super().resolve(name, alias)


class Edge:
    def __init__(self, tokens_file: str = "") -> None:
        self.module = zoo.build("mlp", MLP, seed=3).eval()
        source = BrokenSource()
        source.add("digits", self.module, "mlp", MLP, aliases=["production"])
        self.metrics = Metrics()
        self.pool = ThreadPoolExecutor(max_workers=2)
        self.plane = make_plane(source, self.pool, metrics=self.metrics)
        self.plane.ready = True
        settings = Settings().replace(
            grpc_max_message_bytes=LIMIT, auth=bool(tokens_file), auth_tokens_file=tokens_file
        )
        self.server = build_grpc_server(
            settings, self.plane, self.metrics, health.aio.HealthServicer()
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    async def __aenter__(self) -> "Edge":
        await self.server.start()
        self.channel = grpc.aio.insecure_channel(
            f"127.0.0.1:{self.port}",
            options=[
                ("grpc.max_send_message_length", 8 * LIMIT),
                ("grpc.max_receive_message_length", 8 * LIMIT),
            ],
        )
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.channel.close()
        await self.server.stop(None)
        self.pool.shutdown()


@pytest.fixture
async def edge():
    async with Edge() as e:
        yield e


X = np.random.default_rng(5).standard_normal((4, 64)).astype(np.float32)


def raw_request(x=X, *, name="digits", version="", datatype="FP32", input_name="input"):
    request = pb.ModelInferRequest(model_name=name, model_version=version, id="req-1")
    request.inputs.add(name=input_name, datatype=datatype, shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    return request


def output_of(response: pb.ModelInferResponse) -> np.ndarray:
    (out,) = response.outputs
    return np.frombuffer(response.raw_output_contents[0], "<f4").reshape(tuple(out.shape))


async def code_and_message(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value.code(), info.value.details()


# --- the protocol ---------------------------------------------------------------------------


async def test_reflection_lists_the_api_and_describes_it_without_a_token(tokens_file):
    async with Edge(tokens_file) as edge:  # auth on, no token sent
        reflect = reflection_pb2_grpc.ServerReflectionStub(edge.channel)
        asked = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(
                file_containing_symbol="inference.GRPCInferenceService"
            ),
        ]
        answers = [a async for a in reflect.ServerReflectionInfo(iter(asked))]
    listed = {s.name for s in answers[0].list_services_response.service}
    assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= listed
    assert answers[1].file_descriptor_response.file_descriptor_proto  # the proto, for grpcurl


async def test_the_server_is_live_and_ready(edge):
    assert (await edge.stub.ServerLive(pb.ServerLiveRequest())).live
    assert (await edge.stub.ServerReady(pb.ServerReadyRequest())).ready
    meta = await edge.stub.ServerMetadata(pb.ServerMetadataRequest())
    assert meta.name == "maas-inference" and "model_repository" in meta.extensions


async def test_model_metadata_has_datatypes_and_shapes_with_a_variable_batch(edge):
    meta = await edge.stub.ModelMetadata(pb.ModelMetadataRequest(name="digits"))
    assert (meta.name, list(meta.versions), meta.platform) == ("digits", ["1"], "pytorch")
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("input", "FP32", [-1, 64])
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        ("output", "FP32", [-1, 10])
    ]


async def test_model_ready_is_true_for_a_servable_model_and_false_for_an_unknown_one(edge):
    assert (await edge.stub.ModelReady(pb.ModelReadyRequest(name="digits"))).ready
    assert not (await edge.stub.ModelReady(pb.ModelReadyRequest(name="ghost"))).ready


async def test_infer_with_raw_contents_answers_like_the_model_itself(edge):
    response = await edge.stub.ModelInfer(raw_request())
    assert (response.model_name, response.model_version, response.id) == ("digits", "1", "req-1")
    with torch.inference_mode():
        expected = edge.module(torch.from_numpy(X)).numpy()
    np.testing.assert_allclose(output_of(response), expected, rtol=1e-5, atol=1e-6)


async def test_infer_with_typed_contents_answers_like_raw(edge):
    typed = pb.ModelInferRequest(model_name="digits")
    typed.inputs.add(name="input", datatype="FP32", shape=[4, 64]).contents.fp32_contents.extend(
        X.ravel().tolist()
    )
    typed.outputs.add(name="output")
    raw = await edge.stub.ModelInfer(raw_request())
    answer = await edge.stub.ModelInfer(typed)
    assert not answer.outputs[0].HasField("contents")  # outputs always go back raw
    np.testing.assert_array_equal(output_of(answer), output_of(raw))


async def test_unknown_model_is_not_found_with_a_message(edge):
    code, message = await code_and_message(edge.stub.ModelInfer(raw_request(name="ghost")))
    assert code is grpc.StatusCode.NOT_FOUND and "'ghost'" in message
    code, message = await code_and_message(edge.stub.ModelInfer(raw_request(version="7")))
    assert code is grpc.StatusCode.NOT_FOUND and "version 7" in message


async def test_wrong_datatype_is_invalid_argument_naming_the_expected_one(edge):
    x64 = X.astype(np.float64)
    code, message = await code_and_message(edge.stub.ModelInfer(raw_request(x64, datatype="FP64")))
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert "FP64" in message and "expects FP32 with shape [-1, 64]" in message


async def test_wrong_shape_is_invalid_argument_naming_the_expected_one(edge):
    code, message = await code_and_message(edge.stub.ModelInfer(raw_request(X[:, :16])))
    assert code is grpc.StatusCode.INVALID_ARGUMENT and "shape [-1, 64]" in message


async def test_a_message_over_the_limit_is_resource_exhausted(edge):
    big = np.zeros((2 * LIMIT // 256, 64), np.float32)
    code, message = await code_and_message(edge.stub.ModelInfer(raw_request(big)))
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED and message


async def test_an_unexpected_failure_is_internal_with_only_a_request_id(edge):
    code, message = await code_and_message(edge.stub.ModelInfer(raw_request(name="broken")))
    assert code is grpc.StatusCode.INTERNAL and "request id" in message
    assert "disk on fire" not in message and "RuntimeError" not in message


async def test_requests_are_counted_by_method_and_code(edge):
    await edge.stub.ModelInfer(raw_request())
    await code_and_message(edge.stub.ModelInfer(raw_request(name="ghost")))
    requests = edge.metrics.requests
    assert requests.labels("ModelInfer", "OK")._value.get() == 1
    assert requests.labels("ModelInfer", "NOT_FOUND")._value.get() == 1


async def test_model_config_gives_tritons_view_of_the_signature_and_the_batching(edge):
    config = (await edge.stub.ModelConfig(pb.ModelConfigRequest(name="digits"))).config
    assert (config.name, config.platform, config.max_batch_size) == ("digits", "pytorch", 8)
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        ("input", pb.TYPE_FP32, [64])
    ]
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [
        ("output", pb.TYPE_FP32, [10])
    ]
    assert config.WhichOneof("scheduling_choice") == "dynamic_batching"
    assert config.instance_group[0].kind == pb.ModelInstanceGroup.KIND_CPU


async def test_model_config_of_an_unknown_model_is_not_found(edge):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await edge.stub.ModelConfig(pb.ModelConfigRequest(name="nope"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_statistics_of_a_version_without_a_name_are_refused(edge):
    # The version was ignored, and every model's statistics answered.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await edge.stub.ModelStatistics(pb.ModelStatisticsRequest(version="../x"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "without a name" in (info.value.details() or "")


async def test_statistics_and_the_repository_describe_loaded_versions(edge):
    await edge.stub.ModelInfer(raw_request())
    (stats,) = (
        await edge.stub.ModelStatistics(pb.ModelStatisticsRequest(name="digits"))
    ).model_stats
    assert (stats.name, stats.version, stats.inference_count) == ("digits", "1", 4)
    assert stats.inference_stats.success.count == 1
    index = await edge.stub.RepositoryIndex(pb.RepositoryIndexRequest())
    assert [(m.name, m.version, m.state) for m in index.models] == [("digits", "1", "READY")]
    await edge.stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="digits"))
    index = await edge.stub.RepositoryIndex(pb.RepositoryIndexRequest())
    assert [(m.name, m.version, m.state) for m in index.models] == [("digits", "1", "UNAVAILABLE")]
    assert "not loaded" in index.models[0].reason
    assert not (await edge.stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True))).models
    await edge.stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="digits"))
    assert len((await edge.stub.RepositoryIndex(pb.RepositoryIndexRequest())).models) == 1


async def test_a_grpc_load_asking_to_override_a_file_is_refused(edge) -> None:
    load = pb.RepositoryModelLoadRequest(model_name="digits")
    load.parameters["file:1/model.pt"].bytes_param = b"weights"
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await edge.stub.RepositoryModelLoad(load)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "no config or file overrides" in (refused.value.details() or "")


# --- auth -----------------------------------------------------------------------------------


@pytest.fixture
def tokens_file(tmp_path) -> str:
    path = tmp_path / "tokens.json"
    entry = {"identity": "t", "role": "read", "sha256": hashlib.sha256(TOKEN.encode()).hexdigest()}
    path.write_text(json.dumps({"format": "maas.tokens/1", "tokens": [entry]}))
    return str(path)


async def test_with_auth_on_calls_without_a_known_token_are_unauthenticated(tokens_file):
    async with Edge(tokens_file) as edge:
        code, message = await code_and_message(edge.stub.ModelInfer(raw_request()))
        assert code is grpc.StatusCode.UNAUTHENTICATED and "authorization" in message
        code, _ = await code_and_message(
            edge.stub.ServerLive(
                pb.ServerLiveRequest(), metadata=[("authorization", "Bearer wrong")]
            )
        )
        assert code is grpc.StatusCode.UNAUTHENTICATED
        ok = await edge.stub.ModelInfer(
            raw_request(), metadata=[("authorization", f"Bearer {TOKEN}")]
        )
        assert ok.model_version == "1"
        assert edge.metrics.requests.labels("ModelInfer", "UNAUTHENTICATED")._value.get() == 1


async def test_health_checks_need_no_token(tokens_file):
    async with Edge(tokens_file) as edge:
        check = health_pb2_grpc.HealthStub(edge.channel).Check
        status = (await check(health_pb2.HealthCheckRequest(service=""))).status
        assert status == health_pb2.HealthCheckResponse.SERVING
