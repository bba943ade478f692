"""What the protocol says about a served model — metadata, Triton model config, statistics,
repository index — as OIP protobuf messages, for the gRPC servicer and (as JSON) the REST routes.

``message_json`` prints a message the way Triton's HTTP API does: proto field names, 64-bit
integers as JSON numbers, enums by name, zero values included.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

import maas
from maas.oip import grpc_predict_v2_pb2 as pb
from maas.text.gpt import GPT
from services.inference.batcher import BatchingConfig
from services.inference.dataplane import CatalogueEntry
from services.inference.metrics import Duration
from services.inference.oip_stream import streaming_interface
from services.inference.served import ServedModel
from services.inference.signature import TensorSpec

# Triton's model-config enum for each protocol datatype (BYTES is Triton's TYPE_STRING).
CONFIG_TYPE = {
    "BOOL": pb.TYPE_BOOL,
    "UINT8": pb.TYPE_UINT8,
    "UINT16": pb.TYPE_UINT16,
    "UINT32": pb.TYPE_UINT32,
    "UINT64": pb.TYPE_UINT64,
    "INT8": pb.TYPE_INT8,
    "INT16": pb.TYPE_INT16,
    "INT32": pb.TYPE_INT32,
    "INT64": pb.TYPE_INT64,
    "FP16": pb.TYPE_FP16,
    "FP32": pb.TYPE_FP32,
    "FP64": pb.TYPE_FP64,
    "BYTES": pb.TYPE_STRING,
}


SERVER_NAME = "maas-inference"
# The protocol extensions served (Triton's names), over gRPC and HTTP alike.
EXTENSIONS = ("model_repository", "model_configuration", "statistics", "binary_tensor_data")


def server_metadata() -> pb.ServerMetadataResponse:
    return pb.ServerMetadataResponse(
        name=SERVER_NAME, version=maas.__version__, extensions=list(EXTENSIONS)
    )


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


def model_config(model: ServedModel, batching: BatchingConfig, instances: int) -> pb.ModelConfig:
    """Triton's view: with batching on, ``dims`` leave out the batch dimension and
    ``max_batch_size`` is the most rows one forward pass takes; off, it is 0. A generative
    model's ``parameters`` describe its ModelStreamInfer interface besides."""
    first = 1 if batching.enabled else 0
    config = pb.ModelConfig(
        name=model.name,
        platform=model.platform,
        backend=model.platform,
        max_batch_size=batching.max_batch_size if batching.enabled else 0,
        input=[
            pb.ModelInput(name=s.name, data_type=CONFIG_TYPE[s.datatype], dims=s.shape[first:])
            for s in model.signature.inputs
        ],
        output=[
            pb.ModelOutput(name=s.name, data_type=CONFIG_TYPE[s.datatype], dims=s.shape[first:])
            for s in model.signature.outputs
        ],
        instance_group=[
            pb.ModelInstanceGroup(
                name=f"{model.name}_cpu", kind=pb.ModelInstanceGroup.KIND_CPU, count=instances
            )
        ],
    )
    if batching.enabled:
        config.dynamic_batching.max_queue_delay_microseconds = batching.max_queue_delay_us
    if isinstance(model.module, GPT):
        for key, text in streaming_interface().items():
            config.parameters[key].string_value = text
    return config


def _duration(d: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=d.count, ns=d.ns)


def model_statistics(model: ServedModel) -> pb.ModelStatistics:
    stats = model.stats
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


def repository_index(entries: list[CatalogueEntry]) -> pb.RepositoryIndexResponse:
    return pb.RepositoryIndexResponse(
        models=[
            pb.RepositoryIndexResponse.ModelIndex(
                name=e.name, version=str(e.version), state=e.state, reason=e.reason
            )
            for e in entries
        ]
    )


# --- JSON ------------------------------------------------------------------------------------


def message_json(message: Message) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for fd in message.DESCRIPTOR.fields:
        value = getattr(message, fd.name)
        if fd.type == FieldDescriptor.TYPE_MESSAGE and _is_map(fd):
            out[fd.name] = {
                k: _value(fd.message_type.fields_by_name["value"], v) for k, v in value.items()
            }
        elif fd.is_repeated:
            out[fd.name] = [_value(fd, v) for v in value]
        elif (fd.containing_oneof is not None or fd.type == FieldDescriptor.TYPE_MESSAGE) and (
            not message.HasField(fd.name)
        ):
            continue
        else:
            out[fd.name] = _value(fd, value)
    return out


def _is_map(fd: FieldDescriptor) -> bool:
    return bool(fd.message_type is not None and fd.message_type.GetOptions().map_entry)


def _value(fd: FieldDescriptor, value: Any) -> Any:
    if fd.type == FieldDescriptor.TYPE_MESSAGE:
        return message_json(value)
    if fd.type == FieldDescriptor.TYPE_ENUM:
        return fd.enum_type.values_by_number[value].name
    return value
