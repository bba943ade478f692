"""Open Inference Protocol tensors <-> numpy arrays.

Inputs arrive either as ``raw_input_contents`` (little-endian row-major bytes, one entry per
input) or as typed ``contents`` (one repeated field chosen by the datatype); outputs always go
back raw, because tritonclient's ``as_numpy`` reads only raw outputs. Decoding raw bytes is a
zero-copy, read-only view.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from maas.errors import InvalidArgument
from maas.events import clip, shown
from maas.oip import grpc_predict_v2_pb2 as pb
from maas.text import wire as bytes_tensors
from maas.training import frames
from services.inference.signature import DATATYPE_TO_DTYPE, MAX_DIMS, datatype_of

RAW_OUTPUT_CONTENTS = 6  # ModelInferResponse.raw_output_contents (grpc_predict_v2.proto)
# Which InferTensorContents field carries each datatype when sent typed (FP16 has none).
_TYPED_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


def dtype_of(datatype: str, *, tensor: str) -> np.dtype[Any]:
    try:
        return DATATYPE_TO_DTYPE[datatype]
    except KeyError:
        raise InvalidArgument(
            f"input {shown(tensor)} has datatype {shown(datatype)}, which this server does not "
            f"accept; use one of {', '.join(DATATYPE_TO_DTYPE)} or {bytes_tensors.BYTES}"
        ) from None


def _check_dims(shape: Sequence[int], tensor: str) -> None:
    if len(shape) > MAX_DIMS:
        raise InvalidArgument(
            f"input {shown(tensor)} has {len(shape)} dimensions; at most {MAX_DIMS} are accepted"
        )


def _shape_of(shape: Sequence[int], *, tensor: str) -> tuple[int, ...]:
    _check_dims(shape, tensor)
    if any(d < 0 for d in shape):
        raise InvalidArgument(
            f"input {shown(tensor)} has shape {list(shape)}; every dimension of a request tensor "
            "must be a concrete size >= 0"
        )
    return tuple(int(d) for d in shape)


def decode_raw(tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes) -> np.ndarray:
    """A read-only array viewing ``raw`` as the tensor's datatype and shape."""
    datatype = tensor.datatype
    dtype = DATATYPE_TO_DTYPE.get(datatype)
    if dtype is None:
        if datatype == bytes_tensors.BYTES:  # length-prefixed strings (text models)
            _check_dims(tensor.shape, tensor.name)
            return bytes_tensors.decode_raw(tensor, raw)
        dtype = dtype_of(datatype, tensor=tensor.name)
    shape = tensor.shape[:]  # a list: much cheaper than iterating the repeated field
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) != expected or min(shape, default=0) < 0 or len(shape) > MAX_DIMS:
        _shape_of(shape, tensor=tensor.name)
        raise InvalidArgument(
            f"input {shown(tensor.name)} has {len(raw)} raw bytes, but datatype {datatype} "
            f"with shape {shape} needs {expected}"
        )
    try:
        return np.ndarray(shape, dtype, raw)
    except ValueError as exc:  # e.g. dimensions whose product overflows, beside a zero
        raise InvalidArgument(f"input {shown(tensor.name)} has shape {shape}: {exc}") from None


def decode_typed(tensor: pb.ModelInferRequest.InferInputTensor) -> np.ndarray:
    """An array from the typed ``contents`` field that matches the tensor's datatype."""
    _check_one_contents_field(tensor)
    if tensor.datatype == bytes_tensors.BYTES:
        _check_dims(tensor.shape, tensor.name)
        return bytes_tensors.decode_typed(tensor)
    dtype = dtype_of(tensor.datatype, tensor=tensor.name)
    shape = _shape_of(tensor.shape, tensor=tensor.name)
    field = _TYPED_FIELD.get(tensor.datatype)
    if field is None:
        raise InvalidArgument(
            f"input {shown(tensor.name)} has datatype {shown(tensor.datatype)}, which has no "
            "typed contents field in the protocol; send it as raw_input_contents"
        )
    values = getattr(tensor.contents, field)
    count = math.prod(shape)
    if len(values) != count:
        raise InvalidArgument(
            f"input {shown(tensor.name)} has {len(values)} values in contents.{field}, but shape "
            f"{list(shape)} needs {count}"
        )
    wide = np.asarray(values)
    if dtype.kind in "iu" and wide.size:
        # Repeated int32/uint32 fields carry the narrow types: a value outside the datatype's
        # range would otherwise wrap silently.
        info = np.iinfo(dtype)
        if wide.min() < info.min or wide.max() > info.max:
            raise InvalidArgument(
                f"input {shown(tensor.name)} has contents.{field} values outside the range of "
                f"{tensor.datatype} [{info.min}, {info.max}]"
            )
    try:
        return wide.astype(dtype).reshape(shape)
    except ValueError as exc:  # dimensions whose product overflows, beside a zero
        raise InvalidArgument(
            f"input {shown(tensor.name)} has shape {list(shape)}: {exc}; send a smaller shape"
        ) from None


def _check_one_contents_field(tensor: pb.ModelInferRequest.InferInputTensor) -> None:
    """Values in a contents field other than the datatype's would be ignored: refused."""
    own = _TYPED_FIELD.get(tensor.datatype)
    if tensor.datatype == bytes_tensors.BYTES:
        own = "bytes_contents"
    others = sorted(f.name for f, _ in tensor.contents.ListFields() if f.name != own)
    if own is not None and others:  # no field of its own: decoding refuses it, saying why
        raise InvalidArgument(
            f"input {shown(tensor.name)} has datatype {tensor.datatype} but values in "
            f"contents.{', contents.'.join(others)}; send them in contents.{own} only"
        )


# Triton request parameters of features this server does not have (sequence batching, priority
# levels, request timeouts): refused, so a client relying on one is told rather than served
# as if it had not asked.
UNSUPPORTED_PARAMETERS = ("sequence_id", "sequence_start", "sequence_end", "priority", "timeout")


def check_request_parameters(names: Iterable[str]) -> None:
    unsupported = sorted(set(names) & set(UNSUPPORTED_PARAMETERS))
    if unsupported:
        raise InvalidArgument(
            f"request parameter(s) {', '.join(unsupported)}: this server has no sequence "
            "batching, priority levels or request timeouts; leave them out"
        )


# Triton's shared-memory extension's tensor parameters: this server has none, and a tensor
# asking for it would otherwise be read from (or answered in) the body as if it had not.
SHARED_MEMORY = frozenset(
    {"shared_memory_region", "shared_memory_byte_size", "shared_memory_offset"}
)


def check_tensor_parameters(kind: str, name: str, parameters: Iterable[str]) -> None:
    """InvalidArgument for an input's or output's parameter of an extension not offered."""
    asked = sorted(SHARED_MEMORY.intersection(parameters))
    if asked:
        raise InvalidArgument(
            f"{kind} {shown(name)} has {', '.join(asked)}: this server has no shared-memory "
            "extension; send the tensor in the request and read it from the response"
        )


LOAD_PARAMETERS = ("version",)


def check_load_parameters(names: Iterable[str]) -> None:
    """InvalidArgument for a repository load's parameters other than ``version``: Triton's
    ``config`` and ``file:`` overrides were ignored, the model loaded as registered."""
    other = sorted(set(names) - set(LOAD_PARAMETERS))
    if other:
        raise InvalidArgument(
            f"load parameter(s) {', '.join(clip(n, 40) for n in other)}: this server loads a "
            "model as it was registered (no config or file overrides); it takes only 'version'"
        )


def decode_inputs(request: pb.ModelInferRequest) -> dict[str, np.ndarray]:
    """Every input of a request by name, whichever way it was sent."""
    inputs, raws = request.inputs, request.raw_input_contents
    if raws and len(raws) != len(inputs):
        raise InvalidArgument(
            f"the request has {len(inputs)} inputs but {len(raws)} "
            "raw_input_contents entries; send one raw entry per input, in order, or none"
        )
    arrays: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(inputs):
        name = tensor.name
        if name in arrays:
            raise InvalidArgument(f"input {shown(name)} appears twice in the request")
        if tensor.parameters:
            check_tensor_parameters("input", name, tensor.parameters)
        if raws:
            if tensor.HasField("contents"):
                raise InvalidArgument(
                    f"input {shown(name)} has typed contents while the request also uses "
                    "raw_input_contents; use one form for every input"
                )
            arrays[name] = decode_raw(tensor, raws[i])
        else:
            arrays[name] = decode_typed(tensor)
    return arrays


def raw_output(
    name: str, array: np.ndarray
) -> tuple[pb.ModelInferResponse.InferOutputTensor, memoryview]:
    """``array`` as an output tensor's metadata and its raw contents (little-endian, row-major):
    the array itself when it already is that, so its bytes are copied only into the response."""
    if bytes_tensors.is_bytes_array(array):  # label strings of text classifiers
        datatype, raw = bytes_tensors.BYTES, memoryview(bytes_tensors.encode_raw(array))
    else:
        datatype = datatype_of(array)
        # Native order is little-endian on every platform this runs on; convert what is not.
        if array.dtype.byteorder == ">" or not array.flags.c_contiguous:
            array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        raw = array.data
    tensor = pb.ModelInferResponse.InferOutputTensor(
        name=name, datatype=datatype, shape=array.shape
    )
    return tensor, raw


def infer_response(
    model_name: str, model_version: str, request_id: str, outputs: Sequence[tuple[str, np.ndarray]]
) -> bytes:
    """The serialized ``ModelInferResponse``: protobuf writes the small fields, each output's
    bytes follow as ``raw_output_contents``, copied once (message-then-serialize copied them
    three times: ``tobytes``, into the message, out of it)."""
    encoded = [raw_output(name, array) for name, array in outputs]
    head = pb.ModelInferResponse(
        model_name=model_name,
        model_version=model_version,
        id=request_id,
        outputs=[tensor for tensor, _ in encoded],
    )
    return frames.write_message(head, [(RAW_OUTPUT_CONTENTS, raw) for _, raw in encoded])


# Triton's classification extension (an output's ``classification`` parameter), not offered here.
CLASSIFICATION = "classification"


def requested_outputs(request: pb.ModelInferRequest) -> list[str]:
    """The outputs a request names, in order: each once, and none in a form not offered."""
    names: list[str] = []
    for output in request.outputs:
        check_requested(output.name, output.parameters, names)
        names.append(output.name)
    return names


def check_requested(name: str, parameters: Mapping[str, object], before: Sequence[str]) -> None:
    if CLASSIFICATION in parameters:
        raise InvalidArgument(
            f"output {shown(name)} asks for the classification extension, which this server does "
            "not offer; ask for the output itself"
        )
    check_tensor_parameters("output", name, parameters)
    if name in before:
        raise InvalidArgument(f"output {shown(name)} is requested twice; name each output once")
