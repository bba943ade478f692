"""The gRPC edge: one place that turns exceptions into status codes, counts and times requests,
and checks the optional bearer token.

Any ``MaasError`` becomes its ``grpc_code`` with its message; anything else (or an error whose
``grpc_code`` is missing or not a real status) becomes INTERNAL, so a bug never surfaces as a
hung call or a stack trace on the wire.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from maas.errors import Unauthenticated
from services.inference.metrics import Metrics

log = logging.getLogger(__name__)

Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]
UnaryBehavior = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]

# Probes must work without credentials: orchestrators do not carry the inference token.
UNAUTHENTICATED_METHODS = frozenset(
    {
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
    }
)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a failed call returns."""
    code = grpc.StatusCode.__members__.get(str(getattr(exc, "grpc_code", "")))
    if code is None or code is grpc.StatusCode.OK:
        return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}): {exc}"
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return code, str(message)


def _method_name(full: str) -> str:
    return full.rsplit("/", 1)[-1]


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions to status codes and records per-method counts and latency."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        # Wrapping a handler allocates: cache one wrapper per (method, handler). The handler is
        # part of the key because the auth refusal is one handler shared by every method.
        self._wrapped: dict[tuple[str, grpc.RpcMethodHandler], grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        key = (handler_call_details.method, handler)
        wrapped = self._wrapped.get(key)
        if wrapped is None:
            wrapped = self._wrapped[key] = self._wrap(_method_name(key[0]), handler)
        return wrapped

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        behavior: UnaryBehavior = handler.unary_unary
        latency = self._metrics.latency.labels(method)
        counters: dict[grpc.StatusCode, Any] = {}

        def count(code: grpc.StatusCode) -> None:
            counter = counters.get(code)
            if counter is None:
                counter = counters[code] = self._metrics.requests.labels(method, code.name)
            counter.inc()

        async def mapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            try:
                response = await behavior(request, context)
            except grpc.aio.AbortError:
                count(context.code() or grpc.StatusCode.UNKNOWN)  # type: ignore[attr-defined]
                raise
            except Exception as exc:
                code, message = status_for(exc)
                if code is grpc.StatusCode.INTERNAL:
                    log.exception("%s failed", method)
                count(code)
                await context.abort(code, message)
            else:
                count(grpc.StatusCode.OK)
                return response
            finally:
                latency.observe(time.perf_counter() - started)

        return grpc.unary_unary_rpc_method_handler(
            mapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without ``authorization: Bearer <token>`` (health checks excepted).

    Placed after ``ErrorMappingInterceptor`` so refusals are counted like any other error.
    """

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

        async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
            raise Unauthenticated(
                "this server requires metadata 'authorization: Bearer <token>' "
                "(the value of MAAS_INFERENCE_TOKEN); the call had none or a wrong one"
            )

        # Requests stay undecoded bytes: a refused call is never parsed.
        self._refusal = grpc.unary_unary_rpc_method_handler(refuse)

    def _authorized(self, metadata: Any) -> bool:
        for key, value in metadata or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else bytes(value)
                return hmac.compare_digest(given, self._expected)
        return False

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        if handler_call_details.method in UNAUTHENTICATED_METHODS or self._authorized(
            handler_call_details.invocation_metadata
        ):
            return await continuation(handler_call_details)
        return self._refusal
