"""Tensors on the wire: msgpack maps ``{dtype, shape, data}`` with raw little-endian bytes.

No pickle anywhere. Decoding is zero-copy: the returned numpy array is a read-only view into the
message bytes (copy it before writing to it).
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

from maas.errors import InvalidArgument

# Wire names are numpy's names for the little-endian dtypes; bfloat16 has no numpy dtype, so it
# travels as raw 2-byte words and only torch can view it.
SUPPORTED_DTYPES: tuple[str, ...] = (
    "bool",
    "int8",
    "uint8",
    "int16",
    "uint16",
    "int32",
    "uint32",
    "int64",
    "uint64",
    "float16",
    "float32",
    "float64",
)


def _wire_dtype(array: np.ndarray) -> np.dtype[Any]:
    if array.dtype.name not in SUPPORTED_DTYPES:
        raise InvalidArgument(
            f"tensor dtype {array.dtype.name!r} is not supported on the wire; "
            f"use one of {', '.join(SUPPORTED_DTYPES)}"
        )
    return array.dtype.newbyteorder("<")


def _as_le_contiguous(array: np.ndarray) -> np.ndarray:
    le = _wire_dtype(array)
    # Only copies when the input is big-endian or strided; the common case is a view.
    # (np.asarray keeps 0-d arrays 0-d; np.ascontiguousarray would make them 1-d.)
    return np.asarray(array, dtype=le, order="C")


def _raw_bytes(arr: np.ndarray) -> memoryview:
    # A flat uint8 view works for every shape, including empty and 0-d arrays.
    return arr.reshape(-1).view(np.uint8).data


def tensor_to_map(array: np.ndarray) -> dict[str, Any]:
    """The msgpack-ready map for one tensor; ``data`` is a memoryview (no copy)."""
    arr = _as_le_contiguous(np.asarray(array))
    return {"dtype": arr.dtype.name, "shape": list(arr.shape), "data": _raw_bytes(arr)}


def map_to_tensor(obj: Any) -> np.ndarray:
    """Inverse of ``tensor_to_map``: a read-only array viewing ``obj['data']``."""
    if not isinstance(obj, dict) or not {"dtype", "shape", "data"} <= obj.keys():
        raise InvalidArgument("a tensor must be a map with keys dtype, shape and data")
    dtype_name, shape, data = obj["dtype"], obj["shape"], obj["data"]
    if dtype_name not in SUPPORTED_DTYPES:
        raise InvalidArgument(
            f"tensor dtype {dtype_name!r} is not supported; "
            f"use one of {', '.join(SUPPORTED_DTYPES)}"
        )
    if not isinstance(shape, list | tuple) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise InvalidArgument(f"tensor shape {shape!r} must be a list of non-negative integers")
    if not isinstance(data, bytes | bytearray | memoryview):
        raise InvalidArgument("tensor data must be raw bytes")
    dtype = np.dtype(dtype_name).newbyteorder("<")
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise InvalidArgument(
            f"tensor data has {len(data)} bytes but dtype {dtype_name} and shape {list(shape)} "
            f"need {expected}"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def encode_tensor(array: np.ndarray) -> bytes:
    return msgpack.packb(tensor_to_map(array), use_bin_type=True)


def decode_tensor(payload: bytes) -> np.ndarray:
    try:
        obj = msgpack.unpackb(payload, raw=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise InvalidArgument(f"tensor payload is not valid msgpack: {exc}") from None
    return map_to_tensor(obj)
