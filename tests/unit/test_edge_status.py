"""The gRPC edge's status mapping: a platform error keeps its code and message; anything else,
or a platform error claiming no usable code, is INTERNAL and says only where to look."""

from __future__ import annotations

import grpc
import pytest

from maas.edge import status_for
from maas.edge.server import MAX_STATUS_BYTES
from maas.errors import (
    Cancelled,
    InvalidArgument,
    MaasError,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (NotFound("gone"), grpc.StatusCode.NOT_FOUND),
        (Unauthenticated("who"), grpc.StatusCode.UNAUTHENTICATED),
        (PermissionDenied("no"), grpc.StatusCode.PERMISSION_DENIED),
        (Cancelled("left"), grpc.StatusCode.CANCELLED),
    ],
)
def test_platform_errors_map_to_their_code_and_message(exc: MaasError, code):
    assert status_for(exc) == (code, exc.message)


def test_lookalikes_and_internal_platform_errors_are_internal_without_text():
    class Lookalike(Exception):
        grpc_code = "NOT_FOUND"

    class Bogus(MaasError):
        grpc_code = "NOT_A_STATUS"

    for exc in (Lookalike("leak1"), Bogus("leak2"), MaasError("leak3"), KeyError("leak4")):
        code, message = status_for(exc, "abc")
        assert code is grpc.StatusCode.INTERNAL
        assert message == "internal error (request id abc; see the server log)"


@pytest.mark.parametrize(
    "char", ["t", "é", "\U0001f600", "%"], ids=["ascii", "2-byte", "4-byte", "%"]
)
def test_a_message_too_long_for_the_status_header_is_clipped_to_fit(char):
    # A refusal quoting 20 000 targets or characters overflowed the client's 16 KiB header
    # limit: it saw RESOURCE_EXHAUSTED "Stream removed" instead of INVALID_ARGUMENT.
    exc = InvalidArgument("targets: " + char * 20_000)
    code, message = status_for(exc)
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert message.startswith("targets: " + char) and "more characters)" in message
    assert len(percent_encoded(message)) <= MAX_STATUS_BYTES


def test_a_message_that_fits_is_sent_whole():
    exc = InvalidArgument("é" * 600)  # 3 600 bytes percent-encoded
    assert status_for(exc)[1] == exc.message


def percent_encoded(message: str) -> bytes:
    """As grpc sends a status message (its percent-encoding of grpc-message)."""
    return b"".join(
        bytes([b]) if 0x20 <= b <= 0x7E and b != 0x25 else b"%%%02X" % b for b in message.encode()
    )
