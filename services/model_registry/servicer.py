"""gRPC edge of the registry: decode the request, call the service/core, encode the answer.

Errors are not handled here: ``ErrorInterceptor`` turns every ``MaasError`` into its status code
and anything else into INTERNAL (logged with the traceback, the client sees no internals).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message as ProtoMessage
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from maas.config import Settings
from maas.errors import InvalidArgument, MaasError
from maas.registry import wire
from maas.registry.types import check_version
from maas.registry.v1 import registry_pb2 as pb
from maas.registry.v1 import registry_pb2_grpc as pb_grpc
from services.model_registry.core import model_token, version_token
from services.model_registry.service import Registration, RegistryService

log = logging.getLogger(__name__)

DRAIN_LIMIT_S = 10.0  # how long a refused registration's remaining upload is read and dropped
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ModelRegistry"].full_name


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status a failure becomes; INTERNAL unless it is a MaasError with a known code."""
    code = getattr(grpc.StatusCode, str(getattr(exc, "grpc_code", "")), None)
    if isinstance(exc, MaasError) and isinstance(code, grpc.StatusCode):
        return code, exc.message
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the server log"


def _guard(behavior: Callable[..., Any], method: str) -> Callable[..., Awaitable[Any]]:
    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            result = behavior(request, context)
            return await result if inspect.isawaitable(result) else result
        except grpc.aio.AbortError:
            raise  # the method chose its status itself
        except Exception as exc:
            code, message = status_for(exc)
            if code is grpc.StatusCode.INTERNAL:
                log.exception("%s failed", method)
            await context.abort(code, message)

    return guarded


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions of unary-response methods to status codes (one place for every RPC)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=_guard(handler.unary_unary, method))  # type: ignore[attr-defined,no-any-return]
        if handler.stream_unary is not None:
            return handler._replace(stream_unary=_guard(handler.stream_unary, method))  # type: ignore[attr-defined,no-any-return]
        return handler


class ModelRegistryServicer(pb_grpc.ModelRegistryServicer):
    def __init__(self, service: RegistryService) -> None:
        self._service = service
        self._core = service.core

    async def RegisterVersion(
        self,
        request_iterator: AsyncIterator[pb.RegisterVersionRequest],
        context: grpc.aio.ServicerContext,
    ) -> pb.ModelVersion:
        try:
            return await self._register(request_iterator, context)
        except MaasError:
            # Read what the client is still sending before answering: if the call ends while
            # the client writes, grpc reports INTERNAL to it and our status is lost.
            await _drain(request_iterator)
            raise

    async def _register(
        self,
        request_iterator: AsyncIterator[pb.RegisterVersionRequest],
        context: grpc.aio.ServicerContext,
    ) -> pb.ModelVersion:
        try:
            first = await anext(request_iterator)
        except StopAsyncIteration:
            raise InvalidArgument(
                "RegisterVersion got an empty stream; send a header first"
            ) from None
        if first.WhichOneof("part") != "header":
            raise InvalidArgument("the first RegisterVersion message must be the header")
        header = first.header
        registration = Registration(
            name=header.name,
            manifest_json=header.manifest_json,
            alias=header.alias or None,
            actor=_actor(header.actor, context),
        )
        version = await self._service.register(registration, _chunks(request_iterator))
        return wire.version_to_proto(version)

    async def GetVersion(
        self, request: pb.GetVersionRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelVersion:
        ref = wire.ref_from_proto(request.ref)
        version = await self._service.db(
            self._core.get_version, ref, as_of_ms=request.as_of_ms or None
        )
        return wire.version_to_proto(version)

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        models, token = await self._service.db(
            self._core.list_models, page_size=request.page_size, page_token=request.page_token
        )
        protos, token = fit_page(
            [wire.summary_to_proto(m) for m in models],
            token,
            lambda kept: model_token(models[kept - 1]),
            self._service.limits.max_reply_bytes,
        )
        return pb.ListModelsResponse(models=protos, next_page_token=token)

    async def ListVersions(
        self, request: pb.ListVersionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListVersionsResponse:
        versions, token = await self._service.db(
            self._core.list_versions,
            request.name,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        protos, token = fit_page(
            [wire.version_to_proto(v) for v in versions],
            token,
            lambda kept: version_token(versions[kept - 1]),
            self._service.limits.max_reply_bytes,
        )
        return pb.ListVersionsResponse(versions=protos, next_page_token=token)

    async def SetAlias(
        self, request: pb.SetAliasRequest, context: grpc.aio.ServicerContext
    ) -> pb.AliasChange:
        change = await self._service.write(
            self._core.set_alias,
            request.name,
            request.alias,
            check_version(request.version),
            _actor(request.actor, context),
        )
        return wire.change_to_proto(change)

    async def DeleteAlias(
        self, request: pb.DeleteAliasRequest, context: grpc.aio.ServicerContext
    ) -> pb.AliasChange:
        change = await self._service.write(
            self._core.delete_alias, request.name, request.alias, _actor(request.actor, context)
        )
        return wire.change_to_proto(change)

    async def DeleteVersion(
        self, request: pb.DeleteVersionRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelVersion:
        version = await self._service.delete_version(
            request.name, check_version(request.version), _actor(request.actor, context)
        )
        return wire.version_to_proto(version)

    async def GetLineage(
        self, request: pb.GetLineageRequest, context: grpc.aio.ServicerContext
    ) -> pb.Lineage:
        lineage = await self._service.db(
            self._core.lineage, request.name, check_version(request.version)
        )
        return wire.lineage_to_proto(lineage)

    async def GetAliasHistory(
        self, request: pb.GetAliasHistoryRequest, context: grpc.aio.ServicerContext
    ) -> pb.AliasHistory:
        changes = await self._service.db(
            self._core.alias_history, request.name, request.alias or None
        )
        return pb.AliasHistory(changes=[wire.change_to_proto(c) for c in changes])


M = TypeVar("M", bound=ProtoMessage)


def fit_page(
    protos: list[M], token: str, token_after: Callable[[int], str], max_bytes: int
) -> tuple[list[M], str]:
    """The longest head of a page that fits ``max_bytes`` (at least one item), and its token."""
    total = 0
    for kept, proto in enumerate(protos):
        total += proto.ByteSize() + 8  # the field's tag and length prefix
        if total > max_bytes and kept > 0:
            return protos[:kept], token_after(kept)
    return protos, token


async def _chunks(
    requests: AsyncIterator[pb.RegisterVersionRequest],
) -> AsyncIterator[tuple[str, bytes]]:
    async for message in requests:
        if message.WhichOneof("part") != "chunk":
            raise InvalidArgument("RegisterVersion takes one header, then only file chunks")
        yield message.chunk.file, message.chunk.data


async def _drain(requests: AsyncIterator[Any], limit_s: float = DRAIN_LIMIT_S) -> None:
    with contextlib.suppress(TimeoutError, grpc.aio.AioRpcError, StopAsyncIteration):
        async with asyncio.timeout(limit_s):
            async for _ in requests:
                pass


def _actor(given: str, context: grpc.aio.ServicerContext) -> str:
    return given or f"anonymous ({context.peer()})"


def build_server(
    service: RegistryService, settings: Settings
) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    """The server with the registry, health and reflection services (not started, no port)."""
    limit = settings.grpc_max_message_bytes
    server = grpc.aio.server(
        interceptors=[ErrorInterceptor()],
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
        ],
    )
    pb_grpc.add_ModelRegistryServicer_to_server(ModelRegistryServicer(service), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    return server, health_servicer


async def set_serving(health_servicer: health.aio.HealthServicer, serving: bool) -> None:
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, status)
