"""Client-side pieces of the registry: references, error mapping, the request stream."""

from __future__ import annotations

import grpc
import pytest

from maas.errors import FailedPrecondition, InvalidArgument, MaasError, NotFound, Unavailable
from maas.registry.client import _register_requests, error_from_rpc
from maas.registry.types import ModelRef
from maas.registry.v1 import registry_pb2 as pb


@pytest.mark.parametrize(
    ("text", "ref"),
    [
        ("digits", ModelRef("digits")),
        ("digits@3", ModelRef("digits", version=3)),
        ("digits@production", ModelRef("digits", alias="production")),
        (" digits-mlp.v2@staging ", ModelRef("digits-mlp.v2", alias="staging")),
    ],
)
def test_references_parse_and_print_back(text: str, ref: ModelRef) -> None:
    assert ModelRef.parse(text) == ref
    assert str(ref) == text.strip()


@pytest.mark.parametrize(
    "text",
    [
        "",
        "@3",
        "digits@",
        "digits@0",
        "digits@Prod",
        "a/b",
        "a@b@c",
        "digits@²",
        "digits@" + "9" * 5000,
    ],
)
def test_malformed_references_are_invalid(text: str) -> None:
    with pytest.raises(InvalidArgument):
        ModelRef.parse(text)


def test_a_refused_reference_quotes_at_most_a_bounded_part_of_itself() -> None:
    with pytest.raises(InvalidArgument) as caught:
        ModelRef.parse("x" * 100_000 + "@")
    assert len(str(caught.value)) < 400


def test_a_reference_takes_a_version_or_an_alias_not_both() -> None:
    with pytest.raises(InvalidArgument, match="not both"):
        ModelRef("digits", version=1, alias="production")


class FakeRpcError(grpc.aio.AioRpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.NOT_FOUND, NotFound),
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgument),
        (grpc.StatusCode.FAILED_PRECONDITION, FailedPrecondition),
        (grpc.StatusCode.UNAVAILABLE, Unavailable),
        (grpc.StatusCode.INTERNAL, MaasError),
        (grpc.StatusCode.UNKNOWN, MaasError),
    ],
)
def test_status_codes_come_back_as_the_matching_error(code: grpc.StatusCode, cls: type) -> None:
    error = error_from_rpc(FakeRpcError(code, "model 'x' is not registered"), "get x")
    assert type(error) is cls
    assert error.message == "get x: model 'x' is not registered"


@pytest.mark.parametrize(
    ("details", "hint"),
    [
        (
            "failed to connect to all addresses; last error: UNAVAILABLE: x: Socket closed",
            "set MAAS_GRPC_TLS the same on both",
        ),
        (
            "... CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate",
            "set MAAS_TLS_CA_FILE to the CA",
        ),
    ],
)
def test_a_connection_failing_as_a_tls_mismatch_does_names_the_setting(details, hint) -> None:
    # gRPC's own words named no setting; only `maas stack status` explained the mismatch.
    error = error_from_rpc(FakeRpcError(grpc.StatusCode.UNAVAILABLE, details), "list models")
    assert error.message.startswith(f"list models: {details}; ") and hint in error.message


def test_other_failures_get_no_tls_hint() -> None:
    error = error_from_rpc(FakeRpcError(grpc.StatusCode.UNAVAILABLE, "connection refused"), "get")
    assert error.message == "get: connection refused"


def test_registration_sends_the_header_then_each_file_in_chunks() -> None:
    header = pb.RegisterHeader(name="digits")
    files = {"a": b"x" * 10, "b": b"y" * 3}
    messages = list(_register_requests(header, files, 4))
    assert messages[0].header.name == "digits"
    chunks = [(m.chunk.file, m.chunk.data) for m in messages[1:]]
    assert chunks == [("a", b"xxxx"), ("a", b"xxxx"), ("a", b"xx"), ("b", b"yyy")]
