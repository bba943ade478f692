"""The data plane's tensor-carrying messages as wire frames, written and read by hand around
protobuf so a tensor's bytes are copied once on the way out (straight into the frame) and never
on the way in (numpy views over the received frame). ``write_message`` writes a top-level
message the same way: the inference server's OIP responses.

A frame is an ordinary serialized ``WorkerMessage`` or ``ShardMessage``: any protobuf client may
write or read it. Writing: protobuf serializes the small fields, the tensor fields are appended
as length-delimited fields (protobuf allows fields in any order). Reading: the inner message's
fields are walked once; tensor fields become views, everything else is handed to protobuf to
parse (it checks types, UTF-8 and unknown fields). A frame this reader does not expect (more
than one top-level field, groups) is parsed by protobuf entirely and its tensors copied: slower,
never wrong.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

from google.protobuf.message import DecodeError, Message

from maas.errors import InvalidArgument

Buffer = bytes | bytearray | memoryview

_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5


class _Unusual(Exception):
    """A valid encoding this reader leaves to protobuf (groups)."""


def cuts(start: int, stop: int, step: int) -> Iterator[tuple[int, int]]:
    """``[start, stop)`` cut into consecutive ranges of at most ``step`` elements."""
    for a in range(start, stop, step):
        yield a, min(stop, a + step)


def varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def length_delimited(field: int, length: int) -> bytes:
    """The key and length of a protobuf length-delimited field (wire type 2)."""
    return varint(field << 3 | _LENGTH) + varint(length)


def write(outer_field: int, inner: Message, tensors: Sequence[tuple[int, Buffer]]) -> bytes:
    """A message whose field ``outer_field`` is ``inner`` plus the ``(field, bytes)`` tensors,
    each tensor copied once, into the frame."""
    parts, size = _with_tensors(inner, tensors)
    return b"".join([length_delimited(outer_field, size), *parts])


def write_message(message: Message, tensors: Sequence[tuple[int, Buffer]]) -> bytes:
    """``message`` serialized with the ``(field, bytes)`` tensors as fields of its own, each
    tensor copied once, into the result."""
    return b"".join(_with_tensors(message, tensors)[0])


def _with_tensors(
    message: Message, tensors: Sequence[tuple[int, Buffer]]
) -> tuple[list[Buffer], int]:
    """The pieces of ``message`` plus ``tensors`` (not joined) and their total size."""
    header = message.SerializeToString()
    views = [(field, _bytes_view(data)) for field, data in tensors]
    keys = [length_delimited(field, view.nbytes) for field, view in views]
    size = len(header) + sum(len(k) + v.nbytes for k, (_, v) in zip(keys, views, strict=True))
    parts: list[Buffer] = [header]
    for key, (_, view) in zip(keys, views, strict=True):
        parts += (key, view)
    return parts, size


def _bytes_view(data: Buffer) -> memoryview:
    view = memoryview(data)
    # An empty tensor's view may have a zero in its shape, which cast() refuses.
    return view.cast("B") if view.nbytes else memoryview(b"")


def _read_varint(data: memoryview, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(data) or shift > 63:
            raise DecodeError("truncated or overlong varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(data: memoryview, start: int, stop: int) -> list[tuple[int, int, int, int, int]]:
    """``(field, wire type, start, payload start, end)`` of every field in ``data[start:stop]``."""
    out = []
    pos = start
    while pos < stop:
        begin = pos
        key, pos = _read_varint(data, pos)
        field, wire = key >> 3, key & 7
        if wire == _VARINT:
            _, pos = _read_varint(data, pos)
            payload = begin
        elif wire == _LENGTH:
            length, payload = _read_varint(data, pos)
            pos = payload + length
        elif wire in (_FIXED64, _FIXED32):
            payload = pos
            pos += 8 if wire == _FIXED64 else 4
        else:
            raise _Unusual(f"wire type {wire}")
        if field == 0 or pos > stop:
            raise DecodeError("truncated field")
        out.append((field, wire, begin, payload, pos))
    return out


def read(
    data: Buffer, outer: type[Message], inner: Mapping[int, type[Message]], tensors: frozenset[int]
) -> tuple[int, Message, dict[int, memoryview]]:
    """``(top-level field, its message, tensor views)`` of a frame of ``outer`` whose one field
    is a message (``inner`` gives its type by field number): that message parsed without its
    ``tensors`` fields, which come back as views over ``data`` (the last one wins, as in
    protobuf). InvalidArgument names what is malformed."""
    view = memoryview(data).cast("B")
    try:
        try:
            return _views(view, inner, tensors)
        except _Unusual:
            return _whole(view, outer, tensors)
    except DecodeError as exc:
        raise InvalidArgument(f"a malformed {outer.DESCRIPTOR.full_name}: {exc}") from None


def _views(
    view: memoryview, inner: Mapping[int, type[Message]], tensors: frozenset[int]
) -> tuple[int, Message, dict[int, memoryview]]:
    top = _fields(view, 0, len(view))
    if len(top) != 1 or top[0][1] != _LENGTH or top[0][0] not in inner:
        raise _Unusual("not one message field")
    field, _, _, first, end = top[0]
    header: list[memoryview] = []
    found: dict[int, memoryview] = {}
    for number, wire, begin, payload, stop in _fields(view, first, end):
        if number in tensors and wire == _LENGTH:
            found[number] = view[payload:stop]
        else:
            header.append(view[begin:stop])
    return field, inner[field].FromString(b"".join(header)), found


def _whole(
    view: memoryview, outer: type[Message], tensors: frozenset[int]
) -> tuple[int, Message, dict[int, memoryview]]:
    """What ``read`` gives, by protobuf alone (tensors copied out of the parsed message)."""
    fields = outer.FromString(view.tobytes()).ListFields()
    if len(fields) != 1:
        raise DecodeError(f"it holds {len(fields)} known fields; one is expected")
    descriptor, message = fields[0]
    found: dict[int, memoryview] = {}
    for field, value in message.ListFields():
        if field.number in tensors:
            found[field.number] = memoryview(value)
            message.ClearField(field.name)
    return descriptor.number, message, found
