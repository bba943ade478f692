"""Tensors on the wire: msgpack maps ``{dtype, shape, data}`` with raw little-endian bytes.

No pickle anywhere. Decoding is zero-copy: the returned numpy array is a read-only view into the
message bytes (copy it, or use ``to_torch``, before writing to it). Tensors larger than the
broker's limit are split into ``TensorChunk``s that carry the sha256 of the whole tensor, so a
lost, duplicated-with-different-bytes or corrupted chunk is caught at reassembly.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from maas.errors import IntegrityError, InvalidArgument

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


def to_torch(array: np.ndarray) -> Any:
    """A torch tensor owning a writable copy (torch refuses read-only buffers)."""
    import torch

    return torch.from_numpy(np.array(array, copy=True))


def sha256_hex(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


# --- chunking -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorChunk:
    """One slice of a tensor's bytes; ``sha256`` is of the whole tensor's data."""

    tensor_id: str
    index: int
    count: int
    dtype: str
    shape: tuple[int, ...]
    total_bytes: int
    sha256: str
    data: bytes | memoryview

    def to_map(self) -> dict[str, Any]:
        return {
            "tensor_id": self.tensor_id,
            "index": self.index,
            "count": self.count,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "total_bytes": self.total_bytes,
            "sha256": self.sha256,
            "data": self.data,
        }

    @classmethod
    def from_map(cls, obj: dict[str, Any]) -> TensorChunk:
        try:
            return cls(
                tensor_id=str(obj["tensor_id"]),
                index=int(obj["index"]),
                count=int(obj["count"]),
                dtype=str(obj["dtype"]),
                shape=tuple(int(d) for d in obj["shape"]),
                total_bytes=int(obj["total_bytes"]),
                sha256=str(obj["sha256"]),
                data=obj["data"],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidArgument(f"malformed tensor chunk: {exc!r}") from None

    def encode(self) -> bytes:
        return msgpack.packb(self.to_map(), use_bin_type=True)

    @classmethod
    def decode(cls, payload: bytes) -> TensorChunk:
        try:
            obj = msgpack.unpackb(payload, raw=False)
        except (ValueError, msgpack.UnpackException) as exc:
            raise InvalidArgument(f"chunk payload is not valid msgpack: {exc}") from None
        if not isinstance(obj, dict):
            raise InvalidArgument("chunk payload must be a msgpack map")
        return cls.from_map(obj)


def split_tensor(
    array: np.ndarray, chunk_bytes: int, tensor_id: str | None = None
) -> Iterator[TensorChunk]:
    """Yield chunks of at most ``chunk_bytes`` data each (views, no copies)."""
    if chunk_bytes <= 0:
        raise InvalidArgument(f"chunk_bytes must be positive, got {chunk_bytes}")
    arr = _as_le_contiguous(np.asarray(array))
    raw = _raw_bytes(arr)
    total = len(raw)
    count = max(1, -(-total // chunk_bytes))
    digest = sha256_hex(raw)
    tid = tensor_id or uuid.uuid4().hex
    for index in range(count):
        yield TensorChunk(
            tensor_id=tid,
            index=index,
            count=count,
            dtype=arr.dtype.name,
            shape=tuple(arr.shape),
            total_bytes=total,
            sha256=digest,
            data=raw[index * chunk_bytes : (index + 1) * chunk_bytes],
        )


class ChunkAssembler:
    """Collects the chunks of one tensor in any order and rebuilds it, verified.

    Duplicates of a chunk already held are ignored when identical (Kafka may redeliver) and
    rejected when different; ``result()`` names the missing indices if any are absent.
    """

    def __init__(self) -> None:
        self._header: tuple[str, int, str, tuple[int, ...], int, str] | None = None
        self._parts: dict[int, bytes | memoryview] = {}

    def add(self, chunk: TensorChunk) -> bool:
        """Add a chunk; True once every chunk is present."""
        header = (
            chunk.tensor_id,
            chunk.count,
            chunk.dtype,
            chunk.shape,
            chunk.total_bytes,
            chunk.sha256,
        )
        if self._header is None:
            self._header = header
        elif header != self._header:
            raise IntegrityError(
                f"chunk {chunk.index} of tensor {chunk.tensor_id} disagrees with earlier chunks "
                "on count, dtype, shape, size or sha256"
            )
        if not 0 <= chunk.index < chunk.count:
            raise IntegrityError(f"chunk index {chunk.index} outside 0..{chunk.count - 1}")
        held = self._parts.get(chunk.index)
        if held is not None and bytes(held) != bytes(chunk.data):
            raise IntegrityError(
                f"chunk {chunk.index} of tensor {chunk.tensor_id} arrived twice "
                "with different bytes"
            )
        self._parts[chunk.index] = chunk.data
        return len(self._parts) == chunk.count

    @property
    def missing(self) -> list[int]:
        if self._header is None:
            return []
        return [i for i in range(self._header[1]) if i not in self._parts]

    def result(self) -> np.ndarray:
        if self._header is None:
            raise IntegrityError("no chunks received")
        tensor_id, _count, dtype, shape, total, digest = self._header
        if self.missing:
            raise IntegrityError(f"tensor {tensor_id} is missing chunks {self.missing}")
        buf = bytearray(total)
        offset = 0
        for index in sorted(self._parts):
            part = self._parts[index]
            buf[offset : offset + len(part)] = part
            offset += len(part)
        if offset != total:
            raise IntegrityError(f"tensor {tensor_id} chunks add up to {offset} bytes, not {total}")
        if sha256_hex(buf) != digest:
            raise IntegrityError(f"tensor {tensor_id} failed its sha256 check after reassembly")
        return map_to_tensor({"dtype": dtype, "shape": list(shape), "data": buf})


def join_chunks(chunks: list[TensorChunk]) -> np.ndarray:
    assembler = ChunkAssembler()
    for chunk in chunks:
        assembler.add(chunk)
    return assembler.result()
