"""The data plane's frames: what we write is plain protobuf, what any client writes reads the same,
and received tensors are views, not copies."""

from __future__ import annotations

import numpy as np
import pytest

from maas.errors import InvalidArgument
from maas.training import broadcast, protocol
from maas.training.codecs import NoneCodec
from maas.training.layout import FlatLayout, horizontal
from maas.training.protocol import StepInfo
from maas.training.v1 import training_pb2 as pb

INFO = StepInfo(version=7, samples=16, loss=0.25)


def _push_frame(values: np.ndarray) -> bytes:
    layout = FlatLayout.from_shapes([("w", [len(values)])])
    codec = NoneCodec()
    plan = protocol.PiecePlan.build(
        layout, horizontal(layout, 1)[0], codec, chunk_bytes=1024, per_tensor=True
    )
    (push,) = protocol.tensor_pushes(plan, "w", values, codec, INFO)
    return push.frame


def test_a_written_push_is_an_ordinary_worker_message() -> None:
    values = np.arange(5, dtype=np.float32)
    message = pb.WorkerMessage.FromString(_push_frame(values))
    assert message.WhichOneof("kind") == "push"
    assert (message.push.version, message.push.samples, message.push.loss) == (7, 16, 0.25)
    np.testing.assert_array_equal(np.frombuffer(message.push.values, dtype="<f4"), values)


def test_a_read_push_views_the_received_frame() -> None:
    frame = _push_frame(np.arange(5, dtype=np.float32))
    push = protocol.read_push(frame)
    assert push.values.obj is frame and push.push.values == b""
    assert push.push.version == 7


def test_a_push_written_by_protobuf_reads_the_same_even_with_a_repeated_tensor_field() -> None:
    first = pb.Push(version=3, codec="none", size=2, pieces=1, values=b"\x00" * 8)
    second = pb.Push(values=np.array([1.5, 2.5], dtype="<f4").tobytes(), samples=4)
    # Two serialized messages back to back merge: the last `values` wins, as protobuf says.
    inner = first.SerializeToString() + second.SerializeToString()
    frame = b"\x12" + bytes([len(inner)]) + inner
    push = protocol.read_push(frame)
    expected = pb.WorkerMessage.FromString(frame).push
    assert bytes(push.values) == expected.values
    assert (push.push.version, push.push.samples) == (expected.version, expected.samples) == (3, 4)


def test_a_frame_with_two_top_level_fields_is_read_by_protobuf_alone() -> None:
    join = pb.WorkerMessage(join=pb.Join(job_id="j")).SerializeToString()
    push = pb.WorkerMessage(push=pb.Push(version=2, values=b"abcd")).SerializeToString()
    read = protocol.read_push(join + push)  # the oneof keeps the last one
    assert read.push.version == 2 and bytes(read.values) == b"abcd"


def test_a_join_reads_as_a_join() -> None:
    frame = pb.WorkerMessage(join=pb.Join(job_id="j", worker=1, shard=0)).SerializeToString()
    join = protocol.read_worker_message(frame)
    assert isinstance(join, pb.Join) and (join.job_id, join.worker) == ("j", 1)


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (b"\x12\x09\x08", "malformed maas.training.v1.WorkerMessage"),  # truncated
        (b"\x12\x02\x0a\xff", "malformed maas.training.v1.WorkerMessage"),  # length past the end
        (b"", "holds 0 known fields"),
        (pb.WorkerMessage(join=pb.Join()).SerializeToString(), "carries pushes, not joins"),
    ],
)
def test_a_malformed_frame_is_refused_naming_the_problem(frame: bytes, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        protocol.read_stream_message(frame)


def test_a_pushes_from_reads_as_the_version_it_names() -> None:
    message = protocol.read_stream_message(protocol.pushes_from_frame(41))
    assert isinstance(message, pb.PushesFrom) and message.version == 41


def test_params_pieces_read_back_as_views_over_their_frame() -> None:
    (frame,) = broadcast.params_pieces(
        np.ones(4, dtype=np.float32),
        version=1,
        final=True,
        durable_version=0,
        dtype="float32",
        chunk_bytes=1024,
    )
    piece = broadcast.read_shard_message(frame)
    assert piece.values.obj is frame and piece.params.final
    assert pb.ShardMessage.FromString(frame).params.values == bytes(piece.values)
