"""The Open Inference Protocol's ``BYTES`` tensors <-> numpy object arrays of ``bytes`` (the
server, its stream API and the CLI read and write strings with these).

On the wire a raw ``BYTES`` tensor is its elements in row-major order, each a 4-byte
little-endian length followed by that many bytes (what tritonclient's
``serialize_byte_tensor`` writes and ``deserialize_bytes_tensor`` reads); typed, it is
``contents.bytes_contents``, one entry per element.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence

import numpy as np

from maas.errors import InvalidArgument
from maas.events import shown
from maas.oip import grpc_predict_v2_pb2 as pb

BYTES = "BYTES"
_LENGTH = struct.Struct("<I")
# The most elements a request's BYTES tensor may hold. Each element becomes a Python object of
# its own: 16 MiB of 1-byte elements cost ~370 MB, and 190 KB of gzip 2 GB, on the event loop,
# before the model was even looked up. No model served here takes more than 256 texts a request.
MAX_REQUEST_ELEMENTS = 4096


def element_count(shape: Sequence[int], name: str, limit: int | None) -> int:
    """How many elements ``shape`` holds; InvalidArgument naming ``name`` for a negative
    dimension or more than ``limit`` (None: no limit) elements."""
    if any(d < 0 for d in shape):
        raise InvalidArgument(
            f"input {shown(name)} has shape {list(shape)}; every dimension of a request tensor "
            "must be a concrete size >= 0"
        )
    count = math.prod(shape)
    if limit is not None and count > limit:
        raise InvalidArgument(
            f"input {shown(name)} has shape {list(shape)}, {count} BYTES elements; a request "
            f"tensor of BYTES holds at most {limit}"
        )
    return count


def _check_filled(elements: int, shape: Sequence[int], name: str, limit: int | None) -> None:
    if elements != element_count(shape, name, limit):
        raise InvalidArgument(
            f"input {shown(name)} has {elements} BYTES elements, but shape {list(shape)} needs "
            f"{math.prod(shape)}"
        )


def bytes_array(
    items: Sequence[bytes],
    shape: Sequence[int],
    name: str,
    limit: int | None = MAX_REQUEST_ELEMENTS,
) -> np.ndarray:
    """``items`` as an object array in ``shape``; InvalidArgument naming ``name`` if they do not
    fill it, or if there are more than ``limit``."""
    _check_filled(len(items), shape, name, limit)
    array = np.empty(len(items), dtype=object)
    array[:] = items
    try:
        return array.reshape(tuple(shape))
    except ValueError:  # a zero dimension beside sizes numpy cannot index ([2**40, 2**40, 0])
        raise InvalidArgument(
            f"input {shown(name)} has shape {list(shape)}: array is too big; send a smaller shape"
        ) from None


def decode_raw(tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes) -> np.ndarray:
    """Length-prefixed elements -> an object array of ``bytes`` in the tensor's shape."""
    return decode_items(raw, tensor.shape, tensor.name)


def decode_items(
    raw: bytes | memoryview,
    shape: Sequence[int],
    name: str,
    limit: int | None = MAX_REQUEST_ELEMENTS,
) -> np.ndarray:
    """``raw`` BYTES contents of tensor ``name`` -> an object array of ``bytes`` in ``shape``.
    No more elements are read than the shape holds: the shape is checked against ``limit``
    first (None: no limit, for answers from a server this side trusts)."""
    count = element_count(shape, name, limit)
    items: list[bytes] = []
    view = memoryview(raw)
    offset = 0
    while offset < len(view):
        if len(items) == count:
            raise InvalidArgument(
                f"input {shown(name)} has more BYTES elements than shape {list(shape)} holds "
                f"({count}); {len(view) - offset} bytes are left after the last"
            )
        if offset + _LENGTH.size > len(view):
            raise InvalidArgument(
                f"input {shown(name)}: BYTES element {len(items)} is cut inside its 4-byte "
                "length prefix; each element is a little-endian uint32 length, then the bytes"
            )
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += _LENGTH.size
        if offset + length > len(view):
            raise InvalidArgument(
                f"input {shown(name)}: BYTES element {len(items)} says {length} bytes but "
                f"only {len(view) - offset} remain"
            )
        items.append(bytes(view[offset : offset + length]))
        offset += length
    return bytes_array(items, shape, name)


def texts_array(texts: Sequence[str]) -> np.ndarray:
    """UTF-8 encoded ``texts`` as a BYTES tensor [N]."""
    array = np.empty(len(texts), dtype=object)
    array[:] = [t.encode() for t in texts]
    return array


def decode_typed(tensor: pb.ModelInferRequest.InferInputTensor) -> np.ndarray:
    contents = tensor.contents.bytes_contents
    # Checked before a Python object is made for any element.
    _check_filled(len(contents), tensor.shape, tensor.name, MAX_REQUEST_ELEMENTS)
    return bytes_array(list(contents), tensor.shape, tensor.name)


def encode_raw(array: np.ndarray) -> bytes:
    """An array of ``bytes``/``str`` -> length-prefixed elements (str as UTF-8)."""
    parts: list[bytes] = []
    for item in array.reshape(-1):
        data = item.encode() if isinstance(item, str) else bytes(item)
        parts += [_LENGTH.pack(len(data)), data]
    return b"".join(parts)


def is_bytes_array(array: np.ndarray) -> bool:
    return array.dtype == np.object_ or array.dtype.kind in "SU"
