"""The data plane's gradient messages: pieces cut and reassembled exactly."""

from __future__ import annotations

import numpy as np
import pytest

from maas.errors import InvalidArgument
from maas.training import protocol
from maas.training.codecs import ErrorFeedback, Int8Codec, NoneCodec, TopKCodec, parse_codec
from maas.training.layout import FlatLayout, horizontal, vertical
from maas.training.v1 import training_pb2 as pb

LAYOUT = FlatLayout.from_shapes([("a.weight", [30, 10]), ("a.bias", [30]), ("b.weight", [70])])
INFO = protocol.StepInfo(version=3, samples=32, loss=0.5, accuracy=0.75)


def _assemble(pushes: list[protocol.OutgoingPush], codec: str, size: int) -> np.ndarray:
    assembler = protocol.GradientAssembler(codec, size)
    done = [assembler.add(0, protocol.read_push(p.frame)) for p in pushes]
    assert all(d is None for d in done[:-1])
    contribution = done[-1]
    assert contribution is not None
    assert (contribution.version, contribution.samples, contribution.loss) == (3, 32, 0.5)
    out = np.zeros(size, dtype=np.float32)
    contribution.decode().add_to(out)
    return out


@pytest.mark.parametrize("split", [horizontal, vertical])
def test_per_tensor_pieces_rebuild_each_shards_gradient_exactly(split) -> None:
    grad = np.random.default_rng(0).normal(size=LAYOUT.size).astype(np.float32)
    codec = NoneCodec()
    for part in split(LAYOUT, 2):
        plan = protocol.PiecePlan.build(LAYOUT, part, codec, chunk_bytes=64, per_tensor=True)
        pushes = [
            p for n in LAYOUT.names for p in protocol.tensor_pushes(plan, n, grad, codec, INFO)
        ]
        assert len(pushes) == plan.pieces > len(LAYOUT.names)
        assert max(protocol.read_push(p.frame).values.nbytes for p in pushes) <= 64
        np.testing.assert_array_equal(_assemble(pushes, "none", part.size), part.gather(grad))


def test_pieces_may_arrive_in_any_order_and_a_repeated_one_counts_once() -> None:
    grad = np.arange(LAYOUT.size, dtype=np.float32)
    part = horizontal(LAYOUT, 1)[0]
    plan = protocol.PiecePlan.build(LAYOUT, part, NoneCodec(), chunk_bytes=256, per_tensor=True)
    pushes = [
        p for n in LAYOUT.names for p in protocol.tensor_pushes(plan, n, grad, NoneCodec(), INFO)
    ]
    pushes = [pushes[-1], *reversed(pushes)]  # the last one twice, the first one last
    np.testing.assert_array_equal(_assemble(pushes, "none", part.size), grad)


@pytest.mark.parametrize("spec", ["int8", "topk(0.3)", "none"])
def test_whole_partition_codecs_are_cut_into_pieces_that_decode_to_the_same(spec: str) -> None:
    codec = parse_codec(spec)
    grad = np.random.default_rng(1).normal(size=LAYOUT.size).astype(np.float32)
    part = horizontal(LAYOUT, 2)[1]
    plan = protocol.PiecePlan.build(LAYOUT, part, codec, chunk_bytes=80, per_tensor=False)
    payload = ErrorFeedback(codec).encode(part.gather(grad))
    pushes = protocol.whole_pushes(plan, payload, codec, INFO)
    assert len(pushes) == plan.pieces > 1
    expected = np.zeros(part.size, dtype=np.float32)
    codec.decode(payload, part.size).add_to(expected)
    np.testing.assert_allclose(_assemble(pushes, spec, part.size), expected, rtol=1e-6)


def test_a_topk_plan_knows_its_piece_count_before_encoding() -> None:
    codec = TopKCodec(0.3)
    part = horizontal(LAYOUT, 1)[0]
    for chunk in (8, 40, 88, 4096):
        plan = protocol.PiecePlan.build(LAYOUT, part, codec, chunk_bytes=chunk, per_tensor=False)
        payload = codec.encode(np.ones(part.size, dtype=np.float32))
        assert len(protocol.whole_pushes(plan, payload, codec, INFO)) == plan.pieces


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"codec": "fp16"}, "push codec 'fp16'; the job's is 'none'"),
        ({"offset": 95}, r"push covers \[95, 105\), outside the partition of 100"),
        ({"values": b"\x00" * 7}, "push values has 7 bytes; 10 float32 values need 40"),
        ({"piece": 2, "pieces": 2}, "push piece 2 of 2 is not a piece"),
        ({"version": -1}, "push version -1 is negative"),
        ({"samples": 0}, "push samples=0: a gradient comes from 1 or more rows"),
        ({"samples": -1}, "push samples=-1"),
        (
            {"pieces": 2**32 - 1},
            f"push piece 0 of {2**32 - 1} is not a piece of a partition of 100",
        ),
        ({"values": np.full(10, np.nan, np.float32).tobytes()}, "hold NaN or inf"),
        ({"values": np.full(10, -np.inf, np.float32).tobytes()}, "hold NaN or inf"),
    ],
)
def test_a_malformed_push_is_refused_naming_the_problem(change: dict, message: str) -> None:
    fields = dict(version=0, codec="none", offset=0, size=10, piece=0, pieces=1, samples=1)
    fields["values"] = np.zeros(10, dtype=np.float32).tobytes()
    fields.update(change)
    with pytest.raises(InvalidArgument, match=message):
        protocol.GradientAssembler("none", 100).add(0, _foreign_push(**fields))


def _foreign_push(**fields: object) -> protocol.PushFrame:
    """A push as any protobuf client would write it, read as a shard reads it."""
    frame = pb.WorkerMessage(push=pb.Push(**fields)).SerializeToString()  # type: ignore[arg-type]
    return protocol.read_push(frame)


def test_int8_pieces_need_a_positive_scale() -> None:
    push = _foreign_push(codec="int8", size=4, pieces=1, samples=1, values=b"\x01" * 4, scale=0.0)
    with pytest.raises(InvalidArgument, match="positive finite scale"):
        protocol.GradientAssembler(Int8Codec().name, 4).add(0, push)


def _dense_piece(piece: int, pieces: int, offset: int = 0) -> protocol.PushFrame:
    values = np.ones(10, dtype=np.float32).tobytes()
    return _foreign_push(
        version=0, codec="none", offset=offset, size=10, piece=piece, pieces=pieces, samples=1,
        values=values,
    )  # fmt: skip


def test_the_pieces_of_one_gradient_must_agree_on_their_count() -> None:
    assembler = protocol.GradientAssembler("none", 100)
    assert assembler.add(0, _dense_piece(0, 3)) is None
    with pytest.raises(InvalidArgument, match="has 4 pieces; its first piece said 3"):
        assembler.add(0, _dense_piece(1, 4))


def test_pieces_carrying_more_than_a_partition_holds_are_refused() -> None:
    assembler = protocol.GradientAssembler("none", 20)  # 20 elements: at most 160 bytes
    for piece in range(4):  # 4 x 40 bytes fit, overlapping or not
        assert assembler.add(0, _dense_piece(piece, 10, offset=10)) is None
    assert assembler.add(0, _dense_piece(3, 10, offset=10)) is None  # a repeat replaces itself
    with pytest.raises(InvalidArgument, match="carry 200 bytes, more than a gradient"):
        assembler.add(0, _dense_piece(4, 10, offset=10))


def test_int8_values_are_not_checked_for_finiteness_they_cannot_lack() -> None:
    push = _foreign_push(
        codec="int8", version=0, size=4, pieces=1, samples=1, values=b"\x7f" * 4, scale=0.5
    )
    contribution = protocol.GradientAssembler(Int8Codec().name, 4).add(0, push)
    assert contribution is not None
