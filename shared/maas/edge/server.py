"""The server side of every gRPC edge: one interceptor, the listening port (TLS or not).

``EdgeInterceptor`` does three things for each call, whatever the service:

* **auth**: the call's bearer token must name an identity whose role allows the method
  (``maas.edge.auth``); refusals are UNAUTHENTICATED / PERMISSION_DENIED and never parse the
  request. The identity is bound for the handler: ``current_identity()``.
* **status mapping**: a ``MaasError`` becomes its ``grpc_code`` with its message; anything else
  (and a MaasError whose code is INTERNAL or not a status) becomes INTERNAL whose message holds
  only a request id, the same id the log line with the traceback carries.
* **observation**: an optional ``observe(method, code, seconds)`` per call (metrics).

A request message that does not parse is INVALID_ARGUMENT naming its type (grpc's own answer
would be UNKNOWN with a Python class name).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from maas.config import Settings
from maas.edge.auth import ANONYMOUS, Authorizer, Identity
from maas.edge.tls import server_credentials
from maas.errors import InvalidArgument, MaasError
from maas.events import clip

log = logging.getLogger(__name__)

Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]
Observer = Callable[[str, grpc.StatusCode, float], None]
OK, INTERNAL = grpc.StatusCode.OK, grpc.StatusCode.INTERNAL
REFUSAL_DRAIN_S = 10.0  # how long a refused upload is read and dropped before the answer, at most
REFUSAL_QUIET_S = 0.5  # a refused client that sends nothing for this long is answered then
MAX_STATUS_BYTES = 4096  # of a status message as sent (``fitted_message``)
KINDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")

_identity: contextvars.ContextVar[Identity] = contextvars.ContextVar(
    "maas_edge_identity", default=ANONYMOUS
)


def current_identity() -> Identity:
    """Who the running call is (``anonymous`` with MAAS_AUTH=off or outside a call)."""
    return _identity.get()


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]


def status_for(exc: BaseException, request_id: str = "") -> tuple[grpc.StatusCode, str]:
    """The status code and message a failed call returns; INTERNAL tells nothing but an id."""
    code = grpc.StatusCode.__members__.get(str(getattr(exc, "grpc_code", "")))
    if isinstance(exc, MaasError) and code not in (None, OK, INTERNAL):
        return code, fitted_message(exc.message)
    where = f"request id {request_id}; " if request_id else ""
    return INTERNAL, f"internal error ({where}see the server log)"


def _header_bytes(message: str) -> int:
    """The bytes of ``message`` as grpc-message sends it: UTF-8, percent-encoding every byte
    outside printable ASCII (and ``%``) as three."""
    return sum(1 if 0x20 <= b <= 0x7E and b != 0x25 else 3 for b in message.encode())


def fitted_message(message: str) -> str:
    """``message`` clipped to fit a client's limit on response headers (grpc's soft limit is
    8 KiB for them all, its hard one 16 KiB): past it the client sees RESOURCE_EXHAUSTED
    "Stream removed" instead of the refusal (a message echoing a 20 000-character value)."""
    fitted, size, limit = message, _header_bytes(message), len(message)
    while size > MAX_STATUS_BYTES:
        limit = max(1, limit * MAX_STATUS_BYTES // size - 40)  # room for clip's own note
        fitted = clip(message, limit)
        size = _header_bytes(fitted)
    return fitted


def failure(exc: BaseException, what: str) -> tuple[grpc.StatusCode, str]:
    """``status_for`` a failed ``what`` (a method, a route), under a new request id; an
    INTERNAL one is logged with its traceback and that id, which its message carries."""
    request_id = new_request_id()
    code, message = status_for(exc, request_id)
    if code is INTERNAL:
        log.error("%s failed (request id %s)", what, request_id, exc_info=exc)
    return code, message


def method_name(full: str) -> str:
    return full.rsplit("/", 1)[-1]


class EdgeInterceptor(grpc.aio.ServerInterceptor):
    """Auth, status mapping and observation for every method of a server (see module doc)."""

    def __init__(self, authorizer: Authorizer, observe: Observer | None = None) -> None:
        self._authorizer = authorizer
        self._observe = observe or (lambda method, code, seconds: None)
        # Wrapping a handler allocates: one wrapper per (method, handler), built on first use.
        self._wrapped: dict[tuple[str, grpc.RpcMethodHandler], grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        try:
            identity = self._authorizer.authorize(method, handler_call_details.invocation_metadata)
        except MaasError as refusal:
            return self._refusal(method, handler, refusal)
        # Each call runs in its own task, which copies this context: the handler sees it.
        _identity.set(identity)
        key = (method, handler)
        wrapped = self._wrapped.get(key)
        if wrapped is None:
            wrapped = self._wrapped[key] = self._wrap(method, handler)
        return wrapped

    def _fail(self, method: str, exc: Exception, started: float) -> tuple[grpc.StatusCode, str]:
        code, message = failure(exc, method)
        self._observe(method_name(method), code, time.perf_counter() - started)
        return code, message

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        short = method_name(method)
        kind = next(k for k in KINDS if getattr(handler, k) is not None)
        behavior = getattr(handler, kind)
        streamed_in = kind.startswith("stream_")
        parsed = handler.request_deserializer is not None  # raw-bytes handlers: nothing to check
        if parsed:
            handler = handler._replace(  # type: ignore[attr-defined]
                request_deserializer=_tolerant(handler.request_deserializer)
            )

        def checked(request: Any) -> Any:
            """The request, or what reads its messages, with malformed ones raised here."""
            if not parsed:
                return request  # the training data plane: its frames pass untouched
            if streamed_in:
                return _checked_stream(request)
            if isinstance(request, Malformed):
                raise InvalidArgument(request.message)
            return request

        def finished(context: grpc.aio.ServicerContext, started: float, ok: bool) -> None:
            code = grpc.StatusCode.OK if ok else (context.code() or grpc.StatusCode.UNKNOWN)  # type: ignore[attr-defined]
            self._observe(short, code, time.perf_counter() - started)

        if kind.endswith("_stream") and inspect.isasyncgenfunction(behavior):

            async def streamed(
                request: Any, context: grpc.aio.ServicerContext
            ) -> AsyncIterator[Any]:
                started = time.perf_counter()
                try:
                    async for item in behavior(checked(request), context):
                        yield item
                except grpc.aio.AbortError:
                    finished(context, started, ok=False)
                    raise
                except Exception as exc:
                    await context.abort(*self._fail(method, exc, started))
                else:
                    finished(context, started, ok=True)

            return _replace(handler, kind, streamed)

        async def mapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            try:
                result = behavior(checked(request), context)
                if inspect.isawaitable(result):
                    result = await result
            except grpc.aio.AbortError:
                finished(context, started, ok=False)
                raise
            except Exception as exc:
                await context.abort(*self._fail(method, exc, started))
            else:
                finished(context, started, ok=True)
                return result

        return _replace(handler, kind, mapped)

    def _refusal(
        self, method: str, handler: grpc.RpcMethodHandler, refusal: MaasError
    ) -> grpc.RpcMethodHandler:
        """A handler of the same kind that answers the refusal without parsing the request."""
        code, message = status_for(refusal)
        self._observe(method_name(method), code, 0.0)
        kind = next(k for k in KINDS if getattr(handler, k) is not None)
        streamed_in = kind.startswith("stream_")

        async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if streamed_in:
                await drain_unread(request)
            await context.abort(code, message)

        factory = getattr(grpc, f"{kind}_rpc_method_handler")
        # No deserializer: the request stays bytes, a refused call is never parsed.
        return factory(refuse, response_serializer=handler.response_serializer)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Malformed:
    """What a request message that does not parse becomes: grpc answers a deserializer that
    raises with UNKNOWN and the exception's class; the handler answers INVALID_ARGUMENT."""

    message: str


def _tolerant(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    described = getattr(getattr(deserialize, "__self__", None), "DESCRIPTOR", None)
    kind = getattr(described, "full_name", "request")

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:  # a parser's own error, whatever the bytes were
            return Malformed(
                f"the request is not a valid {kind} message ({exc}); send it as the "
                "service's .proto defines it"
            )

    return parse


async def _checked_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, Malformed):
            raise InvalidArgument(request.message)
        yield request


async def drain_unread(requests: AsyncIterator[Any]) -> None:
    """Read (and drop) what a refused client still streams, before the refusal is answered (by
    the edge or by a handler): a call ended while the client writes reaches it as INTERNAL, and
    the refusal's status would be lost. A client that has gone quiet without closing its side
    (a bidirectional stream waiting for its first answer: a training link, tritonclient's
    stream) is answered then, not after REFUSAL_DRAIN_S."""
    pending = aiter(requests)
    with contextlib.suppress(TimeoutError, StopAsyncIteration, grpc.aio.AioRpcError):
        async with asyncio.timeout(REFUSAL_DRAIN_S):
            while True:
                async with asyncio.timeout(REFUSAL_QUIET_S):
                    await anext(pending)


def _replace(handler: grpc.RpcMethodHandler, kind: str, behavior: Any) -> grpc.RpcMethodHandler:
    return handler._replace(**{kind: behavior})  # type: ignore[attr-defined,no-any-return]


def edge_interceptor(settings: Settings, observe: Observer | None = None) -> EdgeInterceptor:
    """The interceptor for a server configured by ``settings`` (loads the token table)."""
    return EdgeInterceptor(Authorizer.from_settings(settings), observe)


def server_options(
    settings: Settings, limit_bytes: int | None = None, *, keepalive: bool = True
) -> list[tuple[str, int]]:
    """What every gRPC server of the platform is made with; ``keepalive=False`` leaves the
    pings to the caller (the training data plane pings every 2 s, both ways)."""
    limit = limit_bytes or settings.grpc_max_message_bytes
    options = [
        # grpc's default receive limit is 4 MiB: set both directions explicitly.
        ("grpc.max_send_message_length", limit),
        ("grpc.max_receive_message_length", limit),
        # A second server on a taken port must fail, not silently share it.
        ("grpc.so_reuseport", 0),
    ]
    if not keepalive:
        return options
    silence_ms = max(1, settings.grpc_keepalive_s) * 1000
    return options + keepalive_options(silence_ms, peer_pings_ms=CLIENT_PINGS_MS)


# Clients may ping this often without being told off (grpc's server default is 5 minutes, and a
# client pinging more often than it allows is disconnected: ENHANCE_YOUR_CALM).
CLIENT_PINGS_MS = 10_000


def keepalive_options(silence_ms: int, *, peer_pings_ms: int) -> list[tuple[str, int]]:
    """Ping the peer once its calls were silent for ``silence_ms`` and close the connection when
    no answer comes within as long; take the peer's own pings as often as ``peer_pings_ms``. A
    peer that vanished without closing (its machine gone, its process frozen: the kernel keeps
    the connection) otherwise held its calls, and a generation stream its slot, until TCP gave
    up, hours later."""
    return [
        ("grpc.keepalive_time_ms", silence_ms),
        ("grpc.keepalive_timeout_ms", silence_ms),
        # What ends the transport when the ack does not come: grpc's default is a minute, and
        # keepalive_timeout_ms alone did not end a stream to a SIGSTOPped shard in 40 s.
        ("grpc.http2.ping_timeout_ms", silence_ms),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_ping_interval_without_data_ms", peer_pings_ms),
    ]


# grpcio-reflection serves v1alpha only; v1, which grpcurl and newer tools ask first, has the same
# messages field for field under another package, so one servicer answers both.
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def serve_reflection(
    server: grpc.aio.Server, service_names: tuple[str, ...], pool: Any = None
) -> None:
    """Reflection (v1alpha and v1) describing ``service_names`` from ``pool`` (the default
    descriptor pool when None)."""
    servicer = reflection.aio.ReflectionServicer(
        (*service_names, reflection.SERVICE_NAME), pool=pool
    )
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    info = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(REFLECTION_V1, {"ServerReflectionInfo": info}),)
    )


def add_port(server: grpc.aio.Server, address: str, settings: Settings, setting: str) -> int:
    """Bind ``address`` (TLS when MAAS_GRPC_TLS); the port, or InvalidArgument naming
    ``setting`` when it cannot be bound."""
    try:
        if settings.grpc_tls:
            port = server.add_secure_port(address, server_credentials(settings))
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as exc:  # newer grpc raises instead of returning 0
        raise InvalidArgument(f"cannot bind {setting}={address}: {exc}") from None
    if port == 0:
        raise InvalidArgument(f"cannot bind {setting}={address}")
    return port
