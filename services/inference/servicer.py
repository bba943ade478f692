"""The Open Inference Protocol servicer: protobuf in, ``DataPlane`` call, protobuf out.

Nothing here decides anything; errors propagate as ``MaasError`` and the error-mapping
interceptor turns them into status codes.
"""

from __future__ import annotations

from typing import TypeAlias

import grpc

import maas
from maas.errors import InvalidArgument
from maas.oip import grpc_predict_v2_pb2 as pb
from maas.oip import grpc_predict_v2_pb2_grpc as pb_grpc
from services.inference.dataplane import DataPlane, ServedModel
from services.inference.metrics import Duration, ModelStats
from services.inference.signature import TensorSpec
from services.inference.tensors import decode_inputs, encode_output

SERVER_NAME = "maas-inference"
EXTENSIONS = ("model_repository", "statistics")

Context: TypeAlias = grpc.aio.ServicerContext


def _tensor_metadata(spec: TensorSpec) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(
        name=spec.name, datatype=spec.datatype, shape=list(spec.shape)
    )


def model_metadata(model: ServedModel) -> pb.ModelMetadataResponse:
    return pb.ModelMetadataResponse(
        name=model.name,
        versions=[str(model.version)],
        platform=model.platform,
        inputs=[_tensor_metadata(s) for s in model.signature.inputs],
        outputs=[_tensor_metadata(s) for s in model.signature.outputs],
    )


def _duration(d: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=d.count, ns=d.ns)


def model_statistics(model: ServedModel) -> pb.ModelStatistics:
    stats: ModelStats = model.stats
    return pb.ModelStatistics(
        name=model.name,
        version=str(model.version),
        last_inference=stats.last_inference_ms,
        inference_count=stats.inference_count,
        execution_count=stats.execution_count,
        inference_stats=pb.InferStatistics(
            success=_duration(stats.success),
            fail=_duration(stats.fail),
            queue=_duration(stats.queue),
            compute_infer=_duration(stats.compute),
        ),
        batch_stats=[
            pb.InferBatchStatistics(batch_size=rows, compute_infer=_duration(d))
            for rows, d in sorted(stats.batches.items())
        ],
        memory_usage=[pb.MemoryUsage(type="CPU", id=0, byte_size=model.nbytes)],
    )


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, plane: DataPlane) -> None:
        self._plane = plane

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
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=maas.__version__, extensions=list(EXTENSIONS)
        )

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: Context
    ) -> pb.ModelMetadataResponse:
        return model_metadata(await self._plane.model(request.name, request.version))

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: Context
    ) -> pb.ModelInferResponse:
        requested = [o.name for o in request.outputs]
        result = await self._plane.infer(
            request.model_name, request.model_version, decode_inputs(request), requested
        )
        response = pb.ModelInferResponse(
            model_name=result.model.name,
            model_version=str(result.model.version),
            id=request.id,
        )
        for name in requested or list(result.outputs):
            encode_output(response, name, result.outputs[name])
        return response

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: Context
    ) -> pb.ModelStatisticsResponse:
        if request.name:
            models = [await self._plane.model(request.name, request.version)]
        else:
            models = self._plane.loaded()
        return pb.ModelStatisticsResponse(model_stats=[model_statistics(m) for m in models])

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: Context
    ) -> pb.RepositoryIndexResponse:
        # Only loaded versions are listed: the registry is the catalogue of everything else.
        return pb.RepositoryIndexResponse(
            models=[
                pb.RepositoryIndexResponse.ModelIndex(
                    name=m.name, version=str(m.version), state="READY"
                )
                for m in self._plane.loaded()
            ]
        )

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Context
    ) -> pb.RepositoryModelLoadResponse:
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
