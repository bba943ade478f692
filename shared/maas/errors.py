"""The platform's error vocabulary.

Each class says whether retrying can help (the bus and the store retry those) and which gRPC
status code it becomes at a gRPC edge (one interceptor maps them; anything else is INTERNAL).
Messages name the field, the value and what is accepted, so the caller knows what to fix.
"""

from __future__ import annotations


class MaasError(Exception):
    """Base of every error the platform raises on purpose."""

    retriable: bool = False
    grpc_code: str = "INTERNAL"  # a grpc.StatusCode member name; kept as text so no grpc import
    reason_code: str = "internal"  # stable machine-readable code for status events and the DLQ

    def __init__(self, message: str) -> None:
        if not message:
            raise ValueError("MaasError needs a message that says what went wrong")
        super().__init__(message)
        self.message = message


class InvalidArgument(MaasError):
    grpc_code = "INVALID_ARGUMENT"
    reason_code = "invalid_argument"


class SchemaViolation(InvalidArgument):
    """An event does not match its JSON Schema (or cannot be decoded at all)."""

    reason_code = "schema_violation"


class NotFound(MaasError):
    grpc_code = "NOT_FOUND"
    reason_code = "not_found"


class AlreadyExists(MaasError):
    grpc_code = "ALREADY_EXISTS"
    reason_code = "already_exists"


class FailedPrecondition(MaasError):
    grpc_code = "FAILED_PRECONDITION"
    reason_code = "failed_precondition"


class IntegrityError(FailedPrecondition):
    """Bytes do not match their recorded sha256 (tampered, truncated or missing chunk)."""

    reason_code = "integrity"


class ResourceExhausted(MaasError):
    grpc_code = "RESOURCE_EXHAUSTED"
    reason_code = "resource_exhausted"


class Unauthenticated(MaasError):
    grpc_code = "UNAUTHENTICATED"
    reason_code = "unauthenticated"


class PermissionDenied(MaasError):
    """The caller is known, but its role does not allow the call."""

    grpc_code = "PERMISSION_DENIED"
    reason_code = "permission_denied"


class Unavailable(MaasError):
    """A dependency (broker, S3, a peer service) cannot be reached right now."""

    retriable = True
    grpc_code = "UNAVAILABLE"
    reason_code = "unavailable"


class ConsumerDied(Unavailable):
    """A consumer loop stopped for good; the message says why and what stays uncommitted."""

    reason_code = "consumer_died"


class DeadlineExceeded(MaasError):
    retriable = True
    grpc_code = "DEADLINE_EXCEEDED"
    reason_code = "deadline_exceeded"


class Cancelled(MaasError):
    """The caller went away before its request was done: nobody is left to answer."""

    grpc_code = "CANCELLED"
    reason_code = "cancelled"


def is_retriable(exc: BaseException) -> bool:
    return isinstance(exc, MaasError) and exc.retriable
