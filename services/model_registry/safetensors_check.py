"""Is an uploaded file really safetensors, holding the tensors its manifest declares?

Checked on the bytes as they stream to S3: ``HeadCapture`` keeps only the file's head (the
8-byte length and the JSON header), ``check_safetensors`` then reads it against the file's size
and the manifest. So bytes that would only fail when served are refused before the version
commits, without reading the artifact twice. Plain Python; follows the published format: a
little-endian u64 header length, a JSON object of ``name -> {dtype, shape, data_offsets}``
(plus optional ``__metadata__``), then the tensor bytes back to back.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

from maas.errors import InvalidArgument
from maas.events import clip

SUFFIX = ".safetensors"
MAX_HEADER_BYTES = 16 * 1024 * 1024
_LENGTH_BYTES = 8

# safetensors dtype -> (bytes per element, the torch name manifests use)
DTYPES: dict[str, tuple[int, str]] = {
    "BOOL": (1, "bool"),
    "U8": (1, "uint8"),
    "I8": (1, "int8"),
    "I16": (2, "int16"),
    "U16": (2, "uint16"),
    "F16": (2, "float16"),
    "BF16": (2, "bfloat16"),
    "I32": (4, "int32"),
    "U32": (4, "uint32"),
    "F32": (4, "float32"),
    "I64": (8, "int64"),
    "U64": (8, "uint64"),
    "F64": (8, "float64"),
    "F8_E4M3": (1, "float8_e4m3fn"),
    "F8_E5M2": (1, "float8_e5m2"),
}


class HeadCapture:
    """Keeps the first bytes of a stream until the whole safetensors header is in."""

    def __init__(self) -> None:
        self.head = bytearray()
        self._wanted = _LENGTH_BYTES

    def feed(self, data: bytes | memoryview) -> None:
        while data and len(self.head) < self._wanted:
            take = self._wanted - len(self.head)
            self.head += data[:take]
            data = data[take:]
            if self._wanted == _LENGTH_BYTES and len(self.head) == _LENGTH_BYTES:
                (length,) = struct.unpack("<Q", self.head)
                self._wanted += min(length, MAX_HEADER_BYTES + 1)


def check_safetensors(
    name: str, head: bytes, size: int, declared: dict[str, dict[str, Any]] | None
) -> None:
    """InvalidArgument naming the file and the problem unless ``head`` opens a valid file of
    ``size`` bytes whose tensors are exactly ``declared`` (name -> {dtype, shape}) when given."""
    try:
        _check(name, head, size, declared)
    except InvalidArgument as exc:
        raise InvalidArgument(clip(exc.message)) from None  # tensor names may be megabytes


def _check(name: str, head: bytes, size: int, declared: dict[str, dict[str, Any]] | None) -> None:
    header = _header(name, head, size)
    data_bytes = size - _LENGTH_BYTES - int.from_bytes(head[:_LENGTH_BYTES], "little")
    end = 0
    for tensor, entry in sorted(header.items(), key=lambda kv: _start(name, kv)):
        end = _check_entry(name, tensor, entry, end)
    if end != data_bytes:
        raise InvalidArgument(
            f"{name}: its tensors cover {end} bytes but the file holds {data_bytes} after the "
            "header; the file is truncated or padded"
        )
    if declared is not None:
        _match_manifest(name, header, declared)


def _header(name: str, head: bytes, size: int) -> dict[str, Any]:
    if size < _LENGTH_BYTES or len(head) < _LENGTH_BYTES:
        raise InvalidArgument(f"{name} is {size} bytes: too short to be safetensors")
    (length,) = struct.unpack("<Q", head[:_LENGTH_BYTES])
    if length > MAX_HEADER_BYTES or _LENGTH_BYTES + length > size:
        raise InvalidArgument(
            f"{name} is not safetensors: its header length {length} is beyond the file "
            f"({size} bytes) or the {MAX_HEADER_BYTES}-byte limit"
        )
    try:
        header = json.loads(bytes(head[_LENGTH_BYTES : _LENGTH_BYTES + length]))
    except (ValueError, RecursionError) as exc:
        raise InvalidArgument(
            f"{name} is not safetensors: its header is not JSON ({exc})"
        ) from None
    if not isinstance(header, dict):
        raise InvalidArgument(f"{name} is not safetensors: its header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not isinstance(metadata, dict):
        raise InvalidArgument(f"{name}: __metadata__ must be an object of strings")
    return header


def _start(name: str, item: tuple[str, Any]) -> int:
    entry = item[1]
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
    ):
        raise InvalidArgument(f"{name}: tensor {item[0]!r} needs data_offsets [begin, end]")
    return int(offsets[0])


def _check_entry(name: str, tensor: str, entry: dict[str, Any], end: int) -> int:
    dtype, shape = entry.get("dtype"), entry.get("shape")
    if dtype not in DTYPES:
        raise InvalidArgument(
            f"{name}: tensor {tensor!r} has dtype {dtype!r}; accepted: {sorted(DTYPES)}"
        )
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise InvalidArgument(f"{name}: tensor {tensor!r} has shape {shape!r}; need [int >= 0]")
    begin, stop = entry["data_offsets"]
    if begin != end:
        raise InvalidArgument(
            f"{name}: tensor {tensor!r} starts at {begin}, expected {end} (gap or overlap)"
        )
    if stop - begin != math.prod(shape) * DTYPES[dtype][0]:
        raise InvalidArgument(
            f"{name}: tensor {tensor!r} spans {stop - begin} bytes, but {dtype}{shape} needs "
            f"{math.prod(shape) * DTYPES[dtype][0]}"
        )
    return int(stop)


def _match_manifest(name: str, header: dict[str, Any], declared: dict[str, dict[str, Any]]) -> None:
    stored = {t: (DTYPES[e["dtype"]][1], list(e["shape"])) for t, e in header.items()}
    wanted = {t: (str(d.get("dtype")), list(d.get("shape") or [])) for t, d in declared.items()}
    if stored == wanted:
        return
    missing, extra = sorted(set(wanted) - set(stored)), sorted(set(stored) - set(wanted))
    differ = sorted(t for t in set(stored) & set(wanted) if stored[t] != wanted[t])
    detail = "; ".join(
        part
        for part in (
            f"missing {missing[:5]}" if missing else "",
            f"not declared {extra[:5]}" if extra else "",
            ", ".join(
                f"{t} is {stored[t][0]}{stored[t][1]} not {wanted[t][0]}{wanted[t][1]}"
                for t in differ[:5]
            ),
        )
        if part
    )
    raise InvalidArgument(f"{name} does not hold the tensors manifest.tensors declares: {detail}")
