"""The tensor codec: bit-exact round trips, zero-copy decoding, refusal of malformed payloads."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from maas import codec
from maas.errors import InvalidArgument

dtypes = st.sampled_from(codec.SUPPORTED_DTYPES).map(np.dtype)
shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=7)


@given(hnp.arrays(dtypes, shapes))
def test_every_dtype_and_shape_round_trips_bit_exactly(array):
    decoded = codec.decode_tensor(codec.encode_tensor(array))
    assert decoded.dtype == array.dtype.newbyteorder("<")
    assert decoded.shape == array.shape
    assert decoded.tobytes() == np.ascontiguousarray(array).astype(decoded.dtype).tobytes()


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


def test_unsupported_dtype_is_refused_with_the_accepted_list():
    with pytest.raises(InvalidArgument, match="complex128.*float32"):
        codec.encode_tensor(np.zeros(2, dtype=np.complex128))


def test_data_length_must_match_dtype_and_shape():
    with pytest.raises(InvalidArgument, match="need 16"):
        codec.map_to_tensor({"dtype": "float32", "shape": [4], "data": b"\x00" * 15})


def test_garbage_payload_is_an_invalid_argument():
    with pytest.raises(InvalidArgument):
        codec.decode_tensor(b"\xc1not msgpack")
