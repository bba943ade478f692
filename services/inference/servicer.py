"""The Open Inference Protocol servicer: protobuf in, ``DataPlane`` call, protobuf out.

Nothing here decides anything; errors propagate as ``MaasError`` and the error-mapping
interceptor turns them into status codes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TypeAlias

import grpc
from google.protobuf.message import Message

from maas.errors import InvalidArgument
from maas.events import shown
from maas.oip import grpc_predict_v2_pb2 as pb
from maas.oip import grpc_predict_v2_pb2_grpc as pb_grpc
from services.inference import oip_stream
from services.inference.canary import routing_key
from services.inference.dataplane import DataPlane
from services.inference.describe import (
    model_config,
    model_metadata,
    model_statistics,
    repository_index,
    server_metadata,
)
from services.inference.generation import Generators
from services.inference.tensors import (
    check_load_parameters,
    check_request_parameters,
    decode_inputs,
    infer_response,
    requested_outputs,
)

Context: TypeAlias = grpc.aio.ServicerContext


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, plane: DataPlane, generators: Generators | None = None) -> None:
        self._plane = plane
        self._generators = generators or Generators(plane)

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: Context
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: Context
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._plane.ready)

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: Context
    ) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(
            ready=await self._plane.model_ready(request.name, request.version)
        )

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Context
    ) -> pb.ServerMetadataResponse:
        return server_metadata()

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: Context
    ) -> pb.ModelMetadataResponse:
        return model_metadata(await self._plane.model(request.name, request.version))

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Context) -> bytes:
        # Bytes, already serialized (``infer_response``): see ``add_to_server``.
        check_request_parameters(request.parameters)
        requested = requested_outputs(request)
        result = await self._plane.infer(
            request.model_name,
            request.model_version,
            decode_inputs(request),
            requested,
            routing_key(request.parameters, context.invocation_metadata()),
        )
        outputs = result.outputs
        model = result.model
        return infer_response(
            model.name,
            model.version_text,
            request.id,
            [(name, outputs[name]) for name in requested or outputs],
        )

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: Context
    ) -> pb.ModelConfigResponse:
        model = await self._plane.model(request.name, request.version)
        return pb.ModelConfigResponse(
            config=model_config(model, model.batching, self._plane.instances)
        )

    # --- token streaming for generative models: services/inference/oip_stream.py ------------
    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Context
    ) -> None:
        # Written through the context, not yielded: each token goes from its request's task
        # straight to the call, without a queue and two generators in between.
        metadata = context.invocation_metadata() or ()
        await oip_stream.serve(self._generators, request_iterator, context.write, metadata)

    # --- end of token streaming -------------------------------------------------------------

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: Context
    ) -> pb.ModelStatisticsResponse:
        if request.name:
            models = [await self._plane.model(request.name, request.version)]
        elif request.version:
            raise InvalidArgument(
                f"version={shown(request.version)} without a name: name the model too, or send "
                "neither for every loaded version's statistics"
            )
        else:
            models = self._plane.loaded()
        return pb.ModelStatisticsResponse(model_stats=[model_statistics(m) for m in models])

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: Context
    ) -> pb.RepositoryIndexResponse:
        return repository_index(await self._plane.catalogue(ready_only=request.ready))

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Context
    ) -> pb.RepositoryModelLoadResponse:
        check_load_parameters(request.parameters)
        await self._plane.model(request.model_name, _version_parameter(request))
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Context
    ) -> pb.RepositoryModelUnloadResponse:
        if not request.model_name:
            raise InvalidArgument("model_name is empty; name the model to unload")
        self._plane.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()


def _version_parameter(request: pb.RepositoryModelLoadRequest) -> str:
    """Triton's load has no version field; MaaS reads an optional ``version`` parameter."""
    param = request.parameters.get("version")
    if param is None:
        return ""
    choice = param.WhichOneof("parameter_choice")
    if choice == "string_param":
        return param.string_param
    if choice == "int64_param":
        return str(param.int64_param)
    raise InvalidArgument("parameter 'version' must be a string (a number or an alias) or an int64")


SERVICE = "inference.GRPCInferenceService"


class _Registration:
    """Stands in for a server while the generated code registers the service: keeps its table."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        pass  # the same table arrives below, by method name

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        self.handlers.update(handlers)


def message_or_bytes(response: Message | bytes) -> bytes:
    """The response serializer of the methods that may answer serialized bytes."""
    return response if isinstance(response, bytes) else response.SerializeToString()


def add_to_server(servicer: InferenceServicer, server: grpc.aio.Server) -> None:
    """Register ``servicer`` as the generated code does, except that ``ModelInfer`` and
    ``ModelStreamInfer`` may answer bytes already serialized: ``tensors.infer_response`` copies
    the output tensors once, ``oip_stream.TokenResponses`` builds no message per token."""
    table = _Registration()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, table)  # type: ignore[arg-type]
    handlers = dict(table.handlers)
    for method in ("ModelInfer", "ModelStreamInfer"):
        handlers[method] = handlers[method]._replace(  # type: ignore[attr-defined]
            response_serializer=message_or_bytes
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)
