"""The tensor codec: bit-exact round trips, chunking, and detection of corrupt or lost chunks."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from maas import codec
from maas.errors import IntegrityError, InvalidArgument

dtypes = st.sampled_from(codec.SUPPORTED_DTYPES).map(np.dtype)
shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=7)


@given(hnp.arrays(dtypes, shapes))
def test_every_dtype_and_shape_round_trips_bit_exactly(array):
    decoded = codec.decode_tensor(codec.encode_tensor(array))
    assert decoded.dtype == array.dtype.newbyteorder("<")
    assert decoded.shape == array.shape
    assert decoded.tobytes() == np.ascontiguousarray(array).astype(decoded.dtype).tobytes()


@given(hnp.arrays(dtypes, shapes), st.integers(min_value=1, max_value=64))
def test_chunked_tensors_reassemble_bit_exactly(array, chunk_bytes):
    chunks = list(codec.split_tensor(array, chunk_bytes))
    assert all(len(c.data) <= chunk_bytes for c in chunks)
    restored = codec.join_chunks([codec.TensorChunk.decode(c.encode()) for c in reversed(chunks)])
    assert restored.tobytes() == np.ascontiguousarray(array).tobytes()
    assert restored.shape == array.shape


def test_big_endian_input_travels_as_little_endian():
    array = np.arange(6, dtype=">i4").reshape(2, 3)
    decoded = codec.decode_tensor(codec.encode_tensor(array))
    assert decoded.dtype.byteorder in ("<", "=")
    np.testing.assert_array_equal(decoded, array)


def test_non_contiguous_input_is_encoded_in_logical_order():
    array = np.arange(12, dtype=np.float32).reshape(3, 4).T
    np.testing.assert_array_equal(codec.decode_tensor(codec.encode_tensor(array)), array)


def test_decode_is_zero_copy_view_of_the_payload():
    payload = codec.encode_tensor(np.ones(1024, dtype=np.float32))
    decoded = codec.decode_tensor(payload)
    assert not decoded.flags.writeable  # a view into the message, not a copy
    assert codec.to_torch(decoded).sum().item() == 1024


@settings(deadline=None, max_examples=1)
@given(st.just(None))
def test_a_64_mb_tensor_is_chunked_and_reassembled(_):
    array = np.random.default_rng(0).standard_normal(16 * 1024 * 1024, dtype=np.float32)
    chunks = list(codec.split_tensor(array, 4 * 1024 * 1024))
    assert len(chunks) == 16
    assert np.array_equal(codec.join_chunks(chunks), array)


def test_a_missing_chunk_is_named():
    chunks = list(codec.split_tensor(np.arange(100, dtype=np.int64), 64))
    with pytest.raises(IntegrityError, match=r"missing chunks \[2\]"):
        codec.join_chunks(chunks[:2] + chunks[3:])


def test_a_corrupted_chunk_fails_the_sha256_check():
    chunks = list(codec.split_tensor(np.arange(100, dtype=np.int64), 64))
    bad = bytearray(chunks[1].data)
    bad[0] ^= 0xFF
    chunks[1] = codec.TensorChunk(**{**chunks[1].__dict__, "data": bytes(bad)})
    with pytest.raises(IntegrityError, match="sha256"):
        codec.join_chunks(chunks)


def test_an_identical_duplicate_chunk_is_ignored_but_a_different_one_is_refused():
    chunks = list(codec.split_tensor(np.arange(100, dtype=np.int64), 64))
    assembler = codec.ChunkAssembler()
    assembler.add(chunks[0])
    assembler.add(chunks[0])
    forged = codec.TensorChunk(**{**chunks[0].__dict__, "data": b"\x00" * len(chunks[0].data)})
    with pytest.raises(IntegrityError, match="twice"):
        assembler.add(forged)


def test_chunks_of_different_tensors_do_not_mix():
    a = list(codec.split_tensor(np.zeros(100), 64))
    b = list(codec.split_tensor(np.ones(100), 64))
    assembler = codec.ChunkAssembler()
    assembler.add(a[0])
    with pytest.raises(IntegrityError, match="disagrees"):
        assembler.add(b[1])


def test_unsupported_dtype_is_refused_with_the_accepted_list():
    with pytest.raises(InvalidArgument, match="complex128.*float32"):
        codec.encode_tensor(np.zeros(2, dtype=np.complex128))


def test_data_length_must_match_dtype_and_shape():
    with pytest.raises(InvalidArgument, match="need 16"):
        codec.map_to_tensor({"dtype": "float32", "shape": [4], "data": b"\x00" * 15})


def test_garbage_payload_is_an_invalid_argument():
    with pytest.raises(InvalidArgument):
        codec.decode_tensor(b"\xc1not msgpack")
