"""A shard's parameters sent to workers: pieces cut, reassembled, and checked."""

from __future__ import annotations

import numpy as np
import pytest

from maas.errors import InvalidArgument
from maas.training import broadcast


def _params(values: np.ndarray, dtype: str, chunk_bytes: int) -> list[broadcast.ParamsFrame]:
    messages = broadcast.params_pieces(
        values, version=4, final=False, durable_version=2, dtype=dtype, chunk_bytes=chunk_bytes
    )
    return [broadcast.read_shard_message(frame) for frame in messages]


def test_params_pieces_rebuild_the_partition_and_are_a_snapshot() -> None:
    theta = np.arange(1000, dtype=np.float32)
    pieces = _params(theta, "float32", chunk_bytes=512)
    theta += 1  # the shard moves on while the pieces are in flight
    assert len(pieces) == 8 and {p.params.durable_version for p in pieces} == {2}
    assembler = broadcast.ParamsAssembler(1000)
    got = [assembler.add(p) for p in reversed(pieces)]
    assert all(g is None for g in got[:-1])
    whole = got[-1]
    assert whole is not None and whole.version == 4 and not whole.final
    np.testing.assert_array_equal(whole.values, np.arange(1000, dtype=np.float32))


def test_a_single_params_piece_is_viewed_not_copied() -> None:
    (piece,) = _params(np.ones(10, dtype=np.float32), "float32", chunk_bytes=1 << 20)
    whole = broadcast.ParamsAssembler(10).add(piece)
    assert whole is not None and not whole.values.flags.owndata


def test_fp16_broadcast_halves_the_bytes_and_clips_to_the_fp16_range() -> None:
    theta = np.array([1.5, -2.25, 1e6], dtype=np.float32)
    (piece,) = _params(theta, "float16", chunk_bytes=1 << 20)
    assert piece.values.nbytes == 6
    whole = broadcast.ParamsAssembler(3).add(piece)
    assert whole is not None
    np.testing.assert_array_equal(whole.values.astype(np.float32), [1.5, -2.25, 65504.0])


def test_params_of_the_wrong_size_are_refused() -> None:
    (piece,) = _params(np.ones(10, dtype=np.float32), "float32", chunk_bytes=1 << 20)
    with pytest.raises(InvalidArgument, match="params carry 10 values; the partition has 12"):
        broadcast.ParamsAssembler(12).add(piece)
