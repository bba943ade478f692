"""Our OIP proto is wire-identical to the one tritonclient was generated from.

tritonclient and maas.oip register the same ``inference.*`` symbols, so they must never meet in
one process: tritonclient's file descriptor is read in a subprocess and compared as plain data.
"""

import subprocess
import sys

import pytest
from google.protobuf import descriptor_pb2

from maas.oip import grpc_predict_v2_pb2 as pb

DUMP_TRITON = (
    "import sys; from tritonclient.grpc import service_pb2; "
    "sys.stdout.buffer.write(service_pb2.DESCRIPTOR.serialized_pb)"
)


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
    return {f.name: (f.number, f.type, f.label, f.type_name, f.oneof_index if
                     f.HasField("oneof_index") else None) for f in message.field}


@pytest.fixture(scope="module")
def triton() -> descriptor_pb2.FileDescriptorProto:
    raw = subprocess.run([sys.executable, "-c", DUMP_TRITON], check=True, capture_output=True,
                         timeout=120).stdout
    return descriptor_pb2.FileDescriptorProto.FromString(raw)


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
        assert not method.client_streaming and not method.server_streaming


def test_every_message_we_define_has_tritons_field_numbers_and_types(ours, triton):
    theirs = messages(triton)
    mine = messages(ours)
    assert len(mine) >= 40
    for name, message in mine.items():
        assert name in theirs, f"{name} is not in tritonclient's protocol"
        assert wire(message) == wire(theirs[name]), name
