"""The training data plane's gradient messages (``maas.training.v1``) as pure functions: no I/O.

A worker's gradient for one shard and one step is a fixed set of ``Push`` pieces,
known before backward starts (``PiecePlan``): every piece covers elements ``[offset, offset +
size)`` of the shard's partition and holds at most ``chunk_bytes`` of raw little-endian values.
Elementwise lossless codecs (``none``, ``fp16``) cut the gradient per tensor, so a tensor's pieces
leave as soon as backward produced it; lossy codecs (``int8``, ``topk``) encode the whole partition
once backward is over (their error feedback and top-k selection are per partition).
``GradientAssembler`` turns the pieces back into one ``Contribution`` whose decoded pieces are
numpy views over the received bytes: nothing is copied before the shard adds them to its sum.

Parameters go the other way in ``maas.training.broadcast``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from maas.codec import map_to_tensor
from maas.errors import InvalidArgument
from maas.training import frames
from maas.training.aggregate import Contribution
from maas.training.codecs import (
    Decoded,
    DenseGradient,
    GradientCodecType,
    PiecewiseGradient,
    SparseGradient,
    TopKCodec,
    parse_codec,
)
from maas.training.layout import FlatLayout, ParamPartition
from maas.training.v1 import training_pb2 as pb

Piece = DenseGradient | SparseGradient
_VALUE_DTYPES = {"none": "float32", "fp16": "float16", "int8": "int8"}
_ENTRY_BYTES = 8  # a top-k entry: uint32 index + fp32 value
_DENSE_BYTES = 4  # pieces are cut by fp32 size whatever the codec: the plan is codec-neutral


def overlaps(codec: GradientCodecType, mode: str, params: int, min_bytes: int) -> bool:
    """Whether gradient pieces leave per tensor while backward continues: elementwise lossless
    codecs in the modes that send a gradient (local SGD sends a parameter delta), for a model of
    ``params`` parameters whose fp32 gradient is at least ``min_bytes``. A smaller one leaves
    whole once backward is over: per-tensor pieces cost CPU per piece on both sides of the
    stream, and a small model has little backward left to hide the sending behind (a 4 MB
    MLP, 2 workers x 2 shards on 2 cores: 16-23 % more samples/s whole)."""
    return not codec.lossy and mode != "local_sgd" and params * _DENSE_BYTES >= min_bytes


@dataclass(frozen=True)
class Segment:
    """Partition elements ``[offset, offset + size)``, at ``flat`` in the flat vector."""

    offset: int
    size: int
    flat: int


@dataclass(frozen=True)
class PiecePlan:
    """The pieces of one shard's gradient: per tensor (overlapping codecs) or whole."""

    partition: ParamPartition
    pieces: int
    step: int  # elements (dense) or entries (top-k) per piece
    by_tensor: dict[str, tuple[tuple[int, Segment], ...]] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        layout: FlatLayout,
        partition: ParamPartition,
        codec: GradientCodecType,
        chunk_bytes: int,
        *,
        per_tensor: bool,
    ) -> PiecePlan:
        """``per_tensor``: pieces follow the tensors (sent from inside backward); else the
        partition is cut evenly (a codec payload made once backward is over)."""
        if isinstance(codec, TopKCodec):
            entries = max(1, chunk_bytes // _ENTRY_BYTES)
            return cls(partition, math.ceil(codec.keep(partition.size) / entries), entries)
        step = max(1, chunk_bytes // _DENSE_BYTES)
        if not per_tensor:
            return cls(partition, math.ceil(partition.size / step), step)
        by_tensor: dict[str, tuple[tuple[int, Segment], ...]] = {}
        index, local = 0, 0
        for start, stop in partition.ranges:
            for spec in layout.specs:
                a, b = max(start, spec.offset), min(stop, spec.stop)
                if a >= b:
                    continue
                cut = []
                for x, y in frames.cuts(a, b, step):
                    cut.append((index, Segment(local + x - start, y - x, x)))
                    index += 1
                by_tensor[spec.name] = by_tensor.get(spec.name, ()) + tuple(cut)
            local += stop - start
        return cls(partition, index, step, by_tensor)


@dataclass(frozen=True)
class StepInfo:
    version: int
    samples: int
    loss: float | None = None
    accuracy: float | None = None


_PUSH = pb.WorkerMessage.DESCRIPTOR.fields_by_name["push"].number
_JOIN = pb.WorkerMessage.DESCRIPTOR.fields_by_name["join"].number
_PUSHES_FROM = pb.WorkerMessage.DESCRIPTOR.fields_by_name["pushes_from"].number
_PUSH_VALUES = pb.Push.DESCRIPTOR.fields_by_name["values"].number
_PUSH_INDICES = pb.Push.DESCRIPTOR.fields_by_name["indices"].number


@dataclass(frozen=True)
class OutgoingPush:
    """A push as it leaves a worker: its version (kept until a checkpoint covers it) and its
    frame (a serialized ``WorkerMessage``)."""

    version: int
    frame: bytes


def _push(
    info: StepInfo,
    codec: str,
    piece: int,
    pieces: int,
    *,
    values: np.ndarray,
    indices: np.ndarray | None = None,
    **fields: object,
) -> OutgoingPush:
    header = pb.Push(
        version=info.version,
        codec=codec,
        piece=piece,
        pieces=pieces,
        samples=info.samples,
        **fields,  # type: ignore[arg-type]
    )
    if info.loss is not None:
        header.loss = info.loss
    if info.accuracy is not None:
        header.accuracy = info.accuracy
    tensors = [(_PUSH_VALUES, np.ascontiguousarray(values).data)]
    if indices is not None:
        tensors.append((_PUSH_INDICES, np.ascontiguousarray(indices).data))
    return OutgoingPush(info.version, frames.write(_PUSH, header, tensors))


def tensor_pushes(
    plan: PiecePlan, name: str, grad: np.ndarray, codec: GradientCodecType, info: StepInfo
) -> list[OutgoingPush]:
    """The pieces of tensor ``name`` for this shard (``grad`` is the whole flat gradient)."""
    out = []
    for piece, seg in plan.by_tensor.get(name, ()):
        payload = codec.encode(grad[seg.flat : seg.flat + seg.size])
        out.append(
            _push(
                info,
                codec.name,
                piece,
                plan.pieces,
                offset=seg.offset,
                size=seg.size,
                values=map_to_tensor(payload["values"]),
            )
        )
    return out


def whole_pushes(
    plan: PiecePlan, payload: dict[str, object], codec: GradientCodecType, info: StepInfo
) -> list[OutgoingPush]:
    """The pieces of a whole-partition codec payload (lossy codecs, after backward)."""
    size = plan.partition.size
    values = map_to_tensor(payload["values"])
    if isinstance(codec, TopKCodec):
        indices = map_to_tensor(payload["indices"])
        return [
            _push(
                info,
                codec.name,
                i,
                plan.pieces,
                offset=0,
                size=size,
                indices=indices[a:b],
                values=values[a:b],
            )
            for i, (a, b) in enumerate(frames.cuts(0, len(indices), plan.step))
        ]
    scale = float(payload.get("scale", 1.0))  # type: ignore[arg-type]
    return [
        _push(
            info,
            codec.name,
            i,
            plan.pieces,
            offset=a,
            size=b - a,
            scale=scale,
            values=values[a:b],
        )
        for i, (a, b) in enumerate(frames.cuts(0, size, plan.step))
    ]


@dataclass(frozen=True)
class PushFrame:
    """A push as a shard reads it: every small field in ``push``, the tensors as views over
    the received frame."""

    push: pb.Push
    values: memoryview
    indices: memoryview


def read_worker_message(data: frames.Buffer) -> pb.Join | PushFrame | pb.PushesFrom:
    """A received ``WorkerMessage``: its join, its push (views for the tensors), or the version
    the worker pushes from."""
    field, message, tensors = frames.read(
        data,
        pb.WorkerMessage,
        {_JOIN: pb.Join, _PUSH: pb.Push, _PUSHES_FROM: pb.PushesFrom},
        frozenset((_PUSH_VALUES, _PUSH_INDICES)),
    )
    if isinstance(message, pb.Join | pb.PushesFrom):
        return message
    if not isinstance(message, pb.Push):
        raise InvalidArgument(
            f"a WorkerMessage holds a join, a push or pushes_from, not field {field}"
        )
    empty = memoryview(b"")
    return PushFrame(message, tensors.get(_PUSH_VALUES, empty), tensors.get(_PUSH_INDICES, empty))


def read_stream_message(data: frames.Buffer) -> PushFrame | pb.PushesFrom:
    """A received ``WorkerMessage`` after the join: a push or the version the worker pushes
    from."""
    message = read_worker_message(data)
    if isinstance(message, pb.Join):
        raise InvalidArgument("after the join an Exchange stream carries pushes, not joins")
    return message


def read_push(data: frames.Buffer) -> PushFrame:
    """A received ``WorkerMessage`` that must be a push."""
    message = read_worker_message(data)
    if not isinstance(message, PushFrame):
        raise InvalidArgument("expected a push")
    return message


def pushes_from_frame(version: int) -> bytes:
    """The ``WorkerMessage`` saying this worker can push from ``version`` on only."""
    return pb.WorkerMessage(pushes_from=pb.PushesFrom(version=version)).SerializeToString()


def _array(data: memoryview, dtype: str, count: int, what: str) -> np.ndarray:
    itemsize = np.dtype(dtype).itemsize
    if data.nbytes != count * itemsize:
        raise InvalidArgument(
            f"push {what} has {data.nbytes} bytes; {count} {dtype} values need {count * itemsize}"
        )
    return np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<"))


def decode_piece(
    frame: PushFrame, codec: GradientCodecType, partition_size: int
) -> DenseGradient | SparseGradient:
    """One piece as a view over its bytes; names what is malformed."""
    push = frame.push
    if push.codec != codec.name:
        raise InvalidArgument(f"push codec {push.codec!r}; the job's is {codec.name!r}")
    if push.offset < 0 or push.size < 1 or push.offset + push.size > partition_size:
        raise InvalidArgument(
            f"push covers [{push.offset}, {push.offset + push.size}), outside the partition "
            f"of {partition_size}"
        )
    if isinstance(codec, TopKCodec):
        indices = _array(frame.indices, "uint32", frame.indices.nbytes // 4, "indices")
        values = _check_finite(_array(frame.values, "float32", len(indices), "values"), push)
        if len(indices) and int(indices.max()) >= push.size:
            raise InvalidArgument(f"top-k index {int(indices.max())} is outside [0, {push.size})")
        return SparseGradient(indices, values, push.size)
    values = _array(frame.values, _VALUE_DTYPES[codec.name], push.size, "values")
    if not (math.isfinite(push.scale) and (push.scale > 0 or codec.name != "int8")):
        raise InvalidArgument(f"int8 push needs a positive finite scale, got {push.scale}")
    if codec.name == "int8":  # integers times a finite scale: finite
        return DenseGradient(values, push.scale)
    return DenseGradient(_check_finite(values, push), 1.0)


def _check_finite(values: np.ndarray, push: pb.Push) -> np.ndarray:
    """A NaN or inf summed into the step would make every parameter NaN from then on. A worker
    fails its job when its loss stops being a number (``WorkerJob.compute``), so only a faulty
    or foreign client sends one (~80 us a million values, a fraction of a step's work)."""
    if not np.isfinite(values).all():
        raise InvalidArgument(
            f"push values of piece {push.piece} (version {push.version}) hold NaN or inf; "
            "a gradient must be finite"
        )
    return values


def _check_header(push: pb.Push, partition_size: int) -> None:
    """What a push says about itself, before its bytes are looked at."""
    if push.version < 0:
        raise InvalidArgument(f"push version {push.version} is negative")
    if push.samples < 1:
        raise InvalidArgument(f"push samples={push.samples}: a gradient comes from 1 or more rows")
    # Every piece covers at least one element (or one top-k entry) of the partition.
    if not 1 <= push.pieces <= max(1, partition_size) or push.piece >= push.pieces:
        raise InvalidArgument(
            f"push piece {push.piece} of {push.pieces} is not a piece of a partition of "
            f"{partition_size}"
        )


@dataclass
class _Pending:
    count: int  # how many pieces the gradient has, as its first piece said
    pieces: dict[int, tuple[int, Piece]] = field(default_factory=dict)
    nbytes: int = 0  # the received pieces' payload


# The most payload one gradient's pieces may carry, per partition element: a top-k entry (a
# uint32 index and an fp32 value) is the largest. Beyond it the pieces overlap: a faulty client.
_MAX_BYTES_PER_ELEMENT = 8


class GradientAssembler:
    """Pieces from every worker of one job at one shard -> complete contributions."""

    def __init__(self, codec: str, partition_size: int, limit: int = 256) -> None:
        self.codec = parse_codec(codec)
        self.size = partition_size
        self._limit = limit
        self._pending: dict[tuple[int, int], _Pending] = {}

    def add(self, worker: int, frame: PushFrame) -> Contribution | None:
        """The contribution once its last piece arrived; a repeated piece is ignored."""
        push = frame.push
        _check_header(push, self.size)
        decoded = decode_piece(frame, self.codec, self.size)
        key = (worker, int(push.version))
        pending = self._pending.get(key)
        if pending is None:
            if len(self._pending) >= self._limit:  # an abandoned step (its worker died)
                del self._pending[min(self._pending, key=lambda k: k[1])]
            pending = self._pending[key] = _Pending(push.pieces)
        self._keep(pending, key, push, (int(push.offset), decoded), frame)
        if len(pending.pieces) < push.pieces:
            return None
        del self._pending[key]
        parts = [pending.pieces[i] for i in sorted(pending.pieces)]
        grad = _whole(parts, self.size)
        return Contribution(
            worker=worker,
            version=int(push.version),
            samples=int(push.samples),
            decode=lambda: grad,
            loss=push.loss if push.HasField("loss") else None,
            accuracy=push.accuracy if push.HasField("accuracy") else None,
        )

    def _keep(
        self,
        pending: _Pending,
        key: tuple[int, int],
        push: pb.Push,
        piece: tuple[int, Piece],
        frame: PushFrame,
    ) -> None:
        """Add ``piece`` to ``pending``: the pieces of one gradient agree on their count and
        together carry no more than the partition could hold."""
        if push.pieces != pending.count:
            del self._pending[key]
            raise InvalidArgument(
                f"push piece {push.piece} says version {push.version} has {push.pieces} pieces; "
                f"its first piece said {pending.count}"
            )
        nbytes = frame.values.nbytes + frame.indices.nbytes
        repeated = pending.pieces.get(push.piece)
        if repeated is not None:  # a piece sent again replaces itself
            pending.nbytes -= _payload_bytes(repeated[1])
        pending.nbytes += nbytes
        if pending.nbytes > _MAX_BYTES_PER_ELEMENT * self.size:
            del self._pending[key]
            raise InvalidArgument(
                f"the pieces of version {push.version} carry {pending.nbytes} bytes, more than "
                f"a gradient of a partition of {self.size} can"
            )
        pending.pieces[push.piece] = piece

    def drop_below(self, version: int) -> None:
        """Forget incomplete gradients for versions no step can use any more."""
        for key in [k for k in self._pending if k[1] < version]:
            del self._pending[key]


def _payload_bytes(piece: Piece) -> int:
    if isinstance(piece, SparseGradient):
        return int(piece.indices.nbytes + piece.values.nbytes)
    return int(piece.values.nbytes)


def _whole(parts: Sequence[tuple[int, Piece]], size: int) -> Decoded:
    if len(parts) == 1 and parts[0][0] == 0 and parts[0][1].size == size:
        return parts[0][1]  # the common small case: the piece itself, no wrapper
    return PiecewiseGradient(tuple(parts), size)


Emit = Callable[[int, OutgoingPush], None]
