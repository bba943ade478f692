"""Our OIP proto is wire-identical to the one tritonclient was generated from.

Both define the same ``inference.*`` names; maas.oip keeps its own descriptor pool, which is why
the two can be imported side by side here at all. The model-config messages are a subset of
Triton's model_config.proto: each field we define has Triton's number and type.
"""

import numpy as np
import pytest
from google.protobuf import descriptor_pb2
from tritonclient.grpc import model_config_pb2 as triton_config_pb
from tritonclient.grpc import service_pb2 as triton_pb

from maas.oip import grpc_predict_v2_pb2 as pb


def messages(file: descriptor_pb2.FileDescriptorProto) -> dict[str, descriptor_pb2.DescriptorProto]:
    found: dict[str, descriptor_pb2.DescriptorProto] = {}

    def walk(prefix: str, message: descriptor_pb2.DescriptorProto) -> None:
        name = f"{prefix}.{message.name}"
        found[name] = message
        for nested in message.nested_type:
            walk(name, nested)

    for message in file.message_type:
        walk(file.package, message)
    return found


def wire(message: descriptor_pb2.DescriptorProto) -> dict[str, tuple]:
    return {
        f.name: (
            f.number,
            f.type,
            f.label,
            f.type_name,
            f.oneof_index if f.HasField("oneof_index") else None,
        )
        for f in message.field
    }


@pytest.fixture(scope="module")
def triton() -> descriptor_pb2.FileDescriptorProto:
    return descriptor_pb2.FileDescriptorProto.FromString(triton_pb.DESCRIPTOR.serialized_pb)


@pytest.fixture(scope="module")
def triton_config() -> descriptor_pb2.FileDescriptorProto:
    return descriptor_pb2.FileDescriptorProto.FromString(triton_config_pb.DESCRIPTOR.serialized_pb)


@pytest.fixture(scope="module")
def ours() -> descriptor_pb2.FileDescriptorProto:
    return descriptor_pb2.FileDescriptorProto.FromString(pb.DESCRIPTOR.serialized_pb)


def test_package_and_service_names_match(ours, triton):
    assert ours.package == triton.package == "inference"
    assert [s.name for s in ours.service] == ["GRPCInferenceService"]
    assert "GRPCInferenceService" in [s.name for s in triton.service]


def test_every_rpc_we_serve_has_tritons_name_and_message_types(ours, triton):
    theirs = {m.name: m for m in triton.service[0].method}
    for method in ours.service[0].method:
        assert method.name in theirs, method.name
        other = theirs[method.name]
        assert (method.input_type, method.output_type) == (other.input_type, other.output_type)
        assert (method.client_streaming, method.server_streaming) == (
            other.client_streaming,
            other.server_streaming,
        )


def test_every_message_we_define_has_tritons_field_numbers_and_types(ours, triton, triton_config):
    theirs = messages(triton)
    config = messages(triton_config)
    mine = messages(ours)
    assert len(mine) >= 40
    for name, message in mine.items():
        if name in config:  # a subset of the model config: our fields, Triton's numbers
            fields = wire(config[name])
            assert {f: fields.get(f) for f in wire(message)} == wire(message), name
        else:
            assert name in theirs, f"{name} is not in tritonclient's protocol"
            assert wire(message) == wire(theirs[name]), name


def test_the_model_config_datatypes_have_tritons_numbers(ours, triton_config):
    (mine,) = [e for e in ours.enum_type if e.name == "DataType"]
    (theirs,) = [e for e in triton_config.enum_type if e.name == "DataType"]
    assert [(v.name, v.number) for v in mine.value] == [(v.name, v.number) for v in theirs.value]


def test_a_model_config_we_send_reads_back_in_tritonclient():
    ours = pb.ModelConfigResponse()
    ours.config.name, ours.config.max_batch_size = "digits", 64
    ours.config.input.add(name="input", data_type=pb.TYPE_FP32, dims=[64])
    ours.config.dynamic_batching.max_queue_delay_microseconds = 500
    theirs = triton_pb.ModelConfigResponse.FromString(ours.SerializeToString())
    assert (theirs.config.name, theirs.config.max_batch_size) == ("digits", 64)
    assert theirs.config.input[0].data_type == triton_config_pb.TYPE_FP32
    assert list(theirs.config.input[0].dims) == [64]
    assert theirs.config.WhichOneof("scheduling_choice") == "dynamic_batching"
    assert theirs.config.dynamic_batching.max_queue_delay_microseconds == 500


def test_a_request_built_by_tritonclient_decodes_field_for_field():
    theirs = triton_pb.ModelInferRequest(model_name="digits", model_version="production", id="7")
    tensor = theirs.inputs.add(name="input", datatype="FP32", shape=[1, 2])
    tensor.parameters["binary_data_size"].int64_param = 8
    theirs.raw_input_contents.append(np.array([[1, 2]], np.float32).tobytes())
    ours = pb.ModelInferRequest.FromString(theirs.SerializeToString())
    assert (ours.model_name, ours.model_version, ours.id) == ("digits", "production", "7")
    assert (ours.inputs[0].name, list(ours.inputs[0].shape)) == ("input", [1, 2])
    assert ours.inputs[0].parameters["binary_data_size"].int64_param == 8
    assert ours.raw_input_contents[0] == theirs.raw_input_contents[0]
