"""A shard's parameters on their way to workers (``ShardMessage.params``), as pure functions.

A shard sends its partition at a version as ``Params`` pieces in the job's broadcast dtype
(``training.broadcast``: float32, or a float16 copy), made once and sent as is to every worker;
``ParamsAssembler`` rebuilds them (a single piece is viewed, not copied). Gradients, the other
direction, are in ``maas.training.protocol``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from maas.errors import InvalidArgument
from maas.training import frames
from maas.training.codecs import half_precision
from maas.training.v1 import training_pb2 as pb

BROADCAST_DTYPES: tuple[str, ...] = ("float32", "float16")


def broadcast_values(values: np.ndarray, dtype: str) -> np.ndarray:
    """What workers receive of a shard's fp32 parameters: the same, or an fp16 copy."""
    if dtype == "float32":
        return np.asarray(values, dtype=np.float32)
    return half_precision(values)


_PARAMS = pb.ShardMessage.DESCRIPTOR.fields_by_name["params"].number
_PARAMS_VALUES = pb.Params.DESCRIPTOR.fields_by_name["values"].number


def params_pieces(
    values: np.ndarray,
    *,
    version: int,
    final: bool,
    durable_version: int,
    dtype: str,
    chunk_bytes: int,
) -> list[bytes]:
    """A partition's values as ``dtype`` pieces, each a serialized ``ShardMessage``: made once
    and sent as is to every worker (the data plane's server sends bytes, not messages). The
    values are copied once, straight into the frame — a snapshot, as the shard's parameters move
    on while the pieces are in flight. (Protobuf fields may come in any order: the small ones
    are serialized by protobuf, ``values`` is appended by hand.)"""
    sent = broadcast_values(values, dtype)
    step = max(1, chunk_bytes // sent.itemsize)
    cuts = list(frames.cuts(0, len(sent), step)) or [(0, 0)]
    out = []
    for i, (a, b) in enumerate(cuts):
        header = pb.Params(
            version=version,
            final=final,
            durable_version=durable_version,
            dtype=dtype,
            offset=a,
            piece=i,
            pieces=len(cuts),
        )
        out.append(frames.write(_PARAMS, header, [(_PARAMS_VALUES, sent[a:b].data)]))
    return out


@dataclass(frozen=True)
class ParamsFrame:
    """A parameter piece as a worker reads it: the small fields, and the values as a view."""

    params: pb.Params
    values: memoryview


def read_shard_message(data: frames.Buffer) -> ParamsFrame:
    """A received ``ShardMessage``: its parameter piece, values viewed over ``data``."""
    field, message, tensors = frames.read(
        data, pb.ShardMessage, {_PARAMS: pb.Params}, frozenset((_PARAMS_VALUES,))
    )
    if not isinstance(message, pb.Params):
        raise InvalidArgument(f"a ShardMessage holds params, not field {field}")
    return ParamsFrame(message, tensors.get(_PARAMS_VALUES, memoryview(b"")))


@dataclass(frozen=True)
class ShardParams:
    version: int
    values: np.ndarray  # float32, or float16 as broadcast (widened when installed)
    final: bool


class ParamsAssembler:
    """``Params`` pieces of one shard -> its partition at a version."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._version = -1
        self._buffer: np.ndarray | None = None
        self._seen: set[int] = set()

    def add(self, frame: ParamsFrame) -> ShardParams | None:
        params = frame.params
        if params.dtype not in BROADCAST_DTYPES:
            raise InvalidArgument(f"params dtype {params.dtype!r}; use one of {BROADCAST_DTYPES}")
        itemsize = np.dtype(params.dtype).itemsize
        count = frame.values.nbytes // itemsize
        if params.offset < 0 or params.offset + count > self.size or params.piece >= params.pieces:
            raise InvalidArgument(
                f"params piece {params.piece}/{params.pieces} at {params.offset}+{count} does not "
                f"fit a partition of {self.size}"
            )
        values = np.frombuffer(frame.values, dtype=np.dtype(params.dtype).newbyteorder("<"))
        if params.pieces == 1:
            if count != self.size:
                raise InvalidArgument(f"params carry {count} values; the partition has {self.size}")
            return ShardParams(int(params.version), values, params.final)
        if params.version != self._version or self._buffer is None:
            self._version, self._seen = int(params.version), set()
            self._buffer = np.empty(self.size, dtype=params.dtype)
        self._buffer[params.offset : params.offset + count] = values
        self._seen.add(params.piece)
        if len(self._seen) < params.pieces:
            return None
        done, self._buffer, self._version = self._buffer, None, -1
        return ShardParams(int(params.version), done, params.final)
