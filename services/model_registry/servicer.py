"""gRPC edge of the registry: decode the request, call the service/store, encode the answer.

Errors and auth are not handled here: ``maas.edge`` checks the caller's token and role, turns
every ``MaasError`` into its status code and anything else into INTERNAL (logged with the
traceback under a request id; the client sees only the id). The actor recorded for a change is
the caller's token identity, never a name the request carries.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

import grpc
from google.protobuf.message import Message as ProtoMessage
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from maas.config import Settings
from maas.edge import (
    current_identity,
    drain_unread,
    edge_interceptor,
    serve_reflection,
    server_options,
)
from maas.errors import InvalidArgument, MaasError
from maas.events import json_failure
from maas.names import check_name, check_version
from maas.policy import parse_policy
from maas.registry import wire
from maas.registry.client import REGISTRY_SERVICE
from maas.registry.v1 import registry_pb2 as pb
from maas.registry.v1 import registry_pb2_grpc as pb_grpc
from services.model_registry.service import Registration, RegistryService
from services.model_registry.store import (
    history_start,
    history_token,
    model_token,
    version_token,
)

log = logging.getLogger(__name__)

SERVICE_NAME = REGISTRY_SERVICE


class ModelRegistryServicer(pb_grpc.ModelRegistryServicer):
    def __init__(self, service: RegistryService) -> None:
        self._service = service
        self._metadata = service.metadata

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
            await drain_unread(request_iterator)
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
            actor=current_identity().name,
        )
        version = await self._service.register(registration, _chunks(request_iterator))
        return wire.version_to_proto(version)

    async def GetVersion(
        self, request: pb.GetVersionRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelVersion:
        ref = wire.ref_from_proto(request.ref)
        if request.as_of_ms < 0:
            raise InvalidArgument(
                f"as_of_ms={request.as_of_ms} is before 1970: send milliseconds since the epoch, "
                "or 0 for now"
            )
        version = await self._service.db(
            self._metadata.get_version, ref, as_of_ms=request.as_of_ms or None
        )
        return wire.version_to_proto(version)

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        models, token = await self._service.db(
            self._metadata.list_models, page_size=request.page_size, page_token=request.page_token
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
            self._metadata.list_versions,
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
        targets = wire.targets_from_proto(request.targets)
        if targets and request.version:
            raise InvalidArgument("give version or targets, not both (targets: leave version 0)")
        change = await self._service.set_alias(
            request.name,
            request.alias,
            targets[0][0] if targets else check_version(request.version),
            current_identity().name,
            request.reason,
            targets=targets,
        )
        return wire.change_to_proto(change)

    async def GetAliasTargets(
        self, request: pb.GetAliasTargetsRequest, context: grpc.aio.ServicerContext
    ) -> pb.AliasTargets:
        targets = await self._service.db(self._metadata.alias_targets, request.name, request.alias)
        return pb.AliasTargets(
            name=request.name, alias=request.alias, targets=wire.targets_to_proto(targets)
        )

    async def DeleteAlias(
        self, request: pb.DeleteAliasRequest, context: grpc.aio.ServicerContext
    ) -> pb.AliasChange:
        change = await self._service.write(
            self._metadata.delete_alias, request.name, request.alias, current_identity().name
        )
        return wire.change_to_proto(change)

    async def DeleteVersion(
        self, request: pb.DeleteVersionRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelVersion:
        version = await self._service.delete_version(
            request.name, check_version(request.version), current_identity().name
        )
        return wire.version_to_proto(version)

    async def GetLineage(
        self, request: pb.GetLineageRequest, context: grpc.aio.ServicerContext
    ) -> pb.Lineage:
        lineage = await self._service.db(
            self._metadata.lineage, request.name, check_version(request.version)
        )
        return wire.lineage_to_proto(lineage)

    async def GetAliasHistory(
        self, request: pb.GetAliasHistoryRequest, context: grpc.aio.ServicerContext
    ) -> pb.AliasHistory:
        start = history_start(request.page_token)
        changes, token = await self._service.db(
            self._metadata.alias_history,
            request.name,
            request.alias or None,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        protos, token = fit_page(
            [wire.change_to_proto(c) for c in changes],
            token,
            lambda kept: history_token(start + kept),
            self._service.limits.max_reply_bytes,
        )
        return pb.AliasHistory(changes=protos, next_page_token=token)

    async def SetPolicy(
        self, request: pb.SetPolicyRequest, context: grpc.aio.ServicerContext
    ) -> pb.Policy:
        check_name(request.name)  # the name is the first thing a refusal should be about
        policy = parse_policy(_document(request.document_json))
        stored = await self._service.db(
            self._metadata.set_policy, request.name, policy.to_doc(), current_identity().name
        )
        return wire.policy_to_proto(stored)

    async def GetPolicy(
        self, request: pb.GetPolicyRequest, context: grpc.aio.ServicerContext
    ) -> pb.Policy:
        if request.version < 0:
            raise InvalidArgument(f"version {request.version} is negative; 0 means the current")
        policy = await self._service.db(
            self._metadata.get_policy, request.name, request.version or None
        )
        return wire.policy_to_proto(policy)


def _document(text: str) -> object:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise InvalidArgument(f"document_json is not JSON: {json_failure(exc)}") from None


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


def build_server(
    service: RegistryService, settings: Settings
) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    """The server with the registry, health and reflection services (not started, no port)."""
    server = grpc.aio.server(
        interceptors=[edge_interceptor(settings)], options=server_options(settings)
    )
    pb_grpc.add_ModelRegistryServicer_to_server(ModelRegistryServicer(service), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    serve_reflection(server, (SERVICE_NAME, health.SERVICE_NAME))
    return server, health_servicer


async def set_serving(health_servicer: health.aio.HealthServicer, serving: bool) -> None:
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, status)
