"""What a served model accepts and returns, and the check every request passes before queueing.

Zoo models take one FP32 tensor ``input`` of shape ``[batch, *input_shape]`` and return one FP32
tensor ``output`` of shape ``[batch, *output_shape]``; the batch dimension is advertised as -1.
Rejections name what was sent and what the model expects, so the caller can fix the request.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from maas import zoo
from maas.errors import InvalidArgument
from maas.events import shown

# The protocol's datatype names and the numpy dtype each one travels as on the wire.
DATATYPE_TO_DTYPE: dict[str, np.dtype[Any]] = {
    name: np.dtype(dt).newbyteorder("<")
    for name, dt in {
        "BOOL": "bool",
        "UINT8": "uint8",
        "UINT16": "uint16",
        "UINT32": "uint32",
        "UINT64": "uint64",
        "INT8": "int8",
        "INT16": "int16",
        "INT32": "int32",
        "INT64": "int64",
        "FP16": "float16",
        "FP32": "float32",
        "FP64": "float64",
    }.items()
}
# Keyed by dtype objects, not names: ``dtype.name`` costs microseconds per call.
DTYPE_TO_DATATYPE: dict[np.dtype[Any], str] = {dt: name for name, dt in DATATYPE_TO_DTYPE.items()}

INPUT_NAME = "input"
OUTPUT_NAME = "output"
BATCH_DIM = -1
MAX_DIMS = 64  # dimensions a request tensor may have: numpy's limit on an array's


def datatype_of(array: np.ndarray) -> str:
    datatype = DTYPE_TO_DATATYPE.get(array.dtype) or DTYPE_TO_DATATYPE.get(
        array.dtype.newbyteorder("<")
    )
    if datatype is None:
        raise InvalidArgument(f"dtype {array.dtype.name} has no Open Inference Protocol datatype")
    return datatype


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]  # BATCH_DIM first

    def describe(self) -> str:
        return f"{self.name!r} ({self.datatype}, shape {list(self.shape)})"


@dataclass(frozen=True)
class Signature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # Models that read their input as token ids (a config with ``vocab_size``): the vocabulary's
    # size, and each value must be a whole number below it. 0: the input is plain numbers.
    token_vocab: int = 0

    @classmethod
    def for_zoo(cls, arch: str, config: dict[str, Any]) -> Signature:
        rows_in = zoo.input_shape(arch, config)
        rows_out = zoo.output_shape(arch, config)
        return cls(
            inputs=(TensorSpec(INPUT_NAME, "FP32", (BATCH_DIM, *rows_in)),),
            outputs=(TensorSpec(OUTPUT_NAME, "FP32", (BATCH_DIM, *rows_out)),),
            token_vocab=int(getattr(zoo.parse_config(arch, config), "vocab_size", 0) or 0),
        )

    def _generator_note(self) -> str:
        """For a model of token ids (a text generator) asked as if it took text."""
        if not self.token_vocab:
            return ""
        return (
            f" (token ids below {self.token_vocab}, a full context a row). To generate text "
            "from it, call the OpenAI API (POST /v1/completions) or ModelStreamInfer"
        )

    def check_inputs(self, inputs: Mapping[str, np.ndarray], *, model: str) -> np.ndarray:
        """The model's single input, after checking name, datatype and shape."""
        (spec,) = self.inputs
        if len(inputs) == 1:  # the common, valid case in a few comparisons
            array = inputs.get(spec.name)
            if (
                array is not None
                and array.shape[1:] == spec.shape[1:]
                and array.ndim == len(spec.shape)
                and array.shape[0] > 0
                and DTYPE_TO_DATATYPE.get(array.dtype) == spec.datatype
            ):
                return self._check_values(array, spec, model)
        if set(inputs) != {spec.name}:
            raise InvalidArgument(
                f"{model} expects exactly one input {spec.describe()}; the request has "
                f"{shown(sorted(inputs), 200) if inputs else 'no inputs'}{self._generator_note()}"
            )
        array = inputs[spec.name]
        datatype = DTYPE_TO_DATATYPE.get(array.dtype) or (
            "BYTES" if array.dtype == np.object_ else array.dtype.name
        )
        rows = spec.shape[1:]
        if datatype != spec.datatype or array.ndim != len(spec.shape) or array.shape[1:] != rows:
            raise InvalidArgument(
                f"input {spec.name!r} has datatype {datatype} and shape {list(array.shape)}; "
                f"{model} expects {spec.datatype} with shape {list(spec.shape)} "
                f"(-1 = any batch size)"
            )
        if array.shape[0] == 0:
            raise InvalidArgument(f"input {spec.name!r} has no rows; send at least one")
        return self._check_values(array, spec, model)

    def _check_values(self, array: np.ndarray, spec: TensorSpec, model: str) -> np.ndarray:
        """Values a forward pass cannot take are refused per request, before any batching: in
        a batch they would fail (or, under int8 scaling, skew) other callers' rows too."""
        if not np.isfinite(array).all():
            raise InvalidArgument(
                f"input {spec.name!r} holds NaN or infinite values; {model} takes finite numbers"
            )
        if self.token_vocab and not (
            (array >= 0).all() and (array < self.token_vocab).all() and (array % 1 == 0).all()
        ):
            raise InvalidArgument(
                f"input {spec.name!r} holds values that are not token ids; {model} takes whole "
                f"numbers from 0 to {self.token_vocab - 1}"
            )
        return array

    @functools.cached_property
    def answer_row_bytes(self) -> int:
        """The bytes of one row of the fixed-size outputs (BYTES outputs, and any of a variable
        dimension, not counted): worked out once per loaded version, read per request."""
        return sum(
            math.prod(spec.shape[1:]) * DATATYPE_TO_DTYPE[spec.datatype].itemsize
            for spec in self.outputs
            if spec.datatype in DATATYPE_TO_DTYPE and min(spec.shape[1:], default=1) > 0
        )

    def outputs_of(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The reply's outputs by name, from the forward pass's output rows."""
        return {self.outputs[0].name: rows}

    def check_outputs(self, requested: Sequence[str], *, model: str) -> None:
        if not requested:
            return
        known = {spec.name for spec in self.outputs}
        unknown = sorted(set(requested) - known)
        if unknown:
            raise InvalidArgument(
                f"{model} has no output {shown(unknown, 200)}; its outputs are "
                f"{', '.join(spec.describe() for spec in self.outputs)}"
            )
