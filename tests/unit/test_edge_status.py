"""The gRPC edge's status mapping: a platform error keeps its code and message; anything else,
or a platform error claiming no usable code, is INTERNAL and says only where to look."""

from __future__ import annotations

import grpc
import pytest

from maas.edge import status_for
from maas.errors import Cancelled, MaasError, NotFound, PermissionDenied, Unauthenticated


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
