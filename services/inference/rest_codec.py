"""Open Inference Protocol tensors over HTTP/REST <-> numpy arrays.

A request body is a JSON document, optionally followed by raw tensor bytes (Triton's binary
tensor extension, which ``tritonclient.http`` uses): the header ``Inference-Header-Content-Length``
gives the JSON part's length, and every input whose ``parameters.binary_data_size`` is set takes
that many bytes of the rest, in input order, as little-endian row-major data. Other inputs carry
``data``: a row-major list, flat or nested. ``BYTES`` tensors travel as in the KServe v2 REST
protocol: JSON ``data`` holds strings (UTF-8), binary data holds each element as a 4-byte
little-endian length and its bytes (what ``tritonclient.http`` sends for ``np.object_`` arrays).

A response carries an output as JSON ``data`` unless the request asked for binary (an output's
``parameters.binary_data`` or the request's ``parameters.binary_data_output``): then the output's
bytes follow the JSON part and its ``parameters.binary_data_size`` says how many.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from maas.errors import InvalidArgument
from maas.events import shown
from maas.names import small_number
from maas.text import wire
from services.inference.http_app import parse_json
from services.inference.signature import DATATYPE_TO_DTYPE, MAX_DIMS, datatype_of
from services.inference.tensors import (
    check_request_parameters,
    check_requested,
    check_tensor_parameters,
)

HEADER_LENGTH = "Inference-Header-Content-Length"
BYTES_DTYPE = np.dtype(object)  # BYTES tensors are object arrays of ``bytes``, as over gRPC
_END = object()
JSON_TYPE = "application/json"
BINARY_TYPE = "application/octet-stream"


@dataclass
class InferRequest:
    inputs: dict[str, np.ndarray]
    requested: list[str]
    binary: set[str]  # outputs to send as bytes after the JSON part
    binary_all: bool
    id: str = ""


@dataclass
class Body:
    data: bytes
    content_type: str
    headers: dict[str, str] = field(default_factory=dict)


def _json(part: bytes | memoryview) -> dict[str, Any]:
    doc = parse_json(part)
    if not isinstance(doc, dict):
        raise InvalidArgument("the request body must be a JSON object with an 'inputs' list")
    return doc


def json_length(body: bytes, header_length: str | None) -> int:
    """How many of the body's bytes are the JSON part."""
    if header_length is None:
        return len(body)
    length = small_number(header_length.strip())
    if length is None or length > len(body):
        raise InvalidArgument(
            f"header {HEADER_LENGTH} is {shown(header_length)}; it must be the JSON part's "
            f"length in bytes, between 0 and the body's {len(body)}"
        )
    return length


def split_body(body: bytes, json_bytes: int) -> tuple[dict[str, Any], memoryview]:
    """The JSON document (the first ``json_bytes``) and the binary bytes after it."""
    view = memoryview(body)
    return _json(view[:json_bytes]), view[json_bytes:]


def _object(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgument(f"{where} must be a JSON object")
    return value


def _dtype(datatype: Any, where: str) -> np.dtype[Any]:
    if datatype == wire.BYTES:
        return BYTES_DTYPE
    dtype = DATATYPE_TO_DTYPE.get(datatype) if isinstance(datatype, str) else None
    if dtype is None:
        raise InvalidArgument(
            f"{where}.datatype is {shown(datatype)}; use one of {', '.join(DATATYPE_TO_DTYPE)} or "
            f"{wire.BYTES}"
        )
    return dtype


def _strings(data: Any, where: str) -> list[bytes]:
    """A BYTES tensor's JSON ``data``: strings, flat or nested, row-major, as UTF-8 bytes."""
    if not isinstance(data, list):
        raise InvalidArgument(f"{where}.data must be a list of strings (row-major, flat or nested)")
    flat: list[bytes] = []
    pending = [iter(data)]
    # Each depth's list length and element kind: nested rows must all be alike, as numbers'
    # are (a ragged [["x"], ["y", "z"]] filled a shape [3] as if it were flat).
    lengths: dict[int, int] = {}
    kinds: dict[int, bool] = {}  # at each depth: lists (True) or strings (False)
    while pending:
        item = next(pending[-1], _END)
        if item is _END:
            pending.pop()
            continue
        depth = len(pending)
        if kinds.setdefault(depth, isinstance(item, list)) != isinstance(item, list):
            raise InvalidArgument(f"{where}.data is a ragged nested list; rows must be equal")
        if isinstance(item, list):
            if lengths.setdefault(depth, len(item)) != len(item):
                raise InvalidArgument(f"{where}.data is a ragged nested list; rows must be equal")
            pending.append(iter(item))
        elif isinstance(item, str):
            try:
                flat.append(item.encode())
            except UnicodeEncodeError:
                raise InvalidArgument(
                    f"{where}.data element {len(flat)} is not valid Unicode (a lone surrogate?)"
                ) from None
        else:
            raise InvalidArgument(
                f"{where}.data element {len(flat)} is {type(item).__name__}; datatype BYTES "
                "takes strings"
            )
    return flat


def _shape(shape: Any, where: str) -> tuple[int, ...]:
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise InvalidArgument(f"{where}.shape is {shown(shape)}; it must be a list of sizes >= 0")
    if len(shape) > MAX_DIMS:
        raise InvalidArgument(
            f"{where}.shape has {len(shape)} dimensions; at most {MAX_DIMS} are accepted"
        )
    return tuple(shape)


def _from_bytes(
    binary: memoryview,
    offset: int,
    size: Any,
    dtype: np.dtype[Any],
    shape: tuple[int, ...],
    where: str,
) -> np.ndarray:
    expected = math.prod(shape) * dtype.itemsize
    if isinstance(size, bool) or not isinstance(size, int) or size != expected:
        raise InvalidArgument(
            f"{where}.parameters.binary_data_size is {size!r}, but shape {list(shape)} of "
            f"{dtype.name} needs {expected} bytes"
        )
    if offset + size > len(binary):
        raise InvalidArgument(
            f"{where} needs {size} binary bytes at offset {offset}, but only {len(binary)} "
            "follow the JSON part"
        )
    # A read-only view of the body: no copy until the forward pass batches it.
    flat = np.frombuffer(binary, dtype=dtype, count=math.prod(shape), offset=offset)
    return _reshaped(flat, shape, where)


def _reshaped(flat: np.ndarray, shape: tuple[int, ...], where: str) -> np.ndarray:
    try:
        return flat.reshape(shape)
    except ValueError as exc:  # sizes whose product numpy cannot index, beside a zero
        raise InvalidArgument(f"{where}.shape is {list(shape)}: {exc}") from None


def _bytes_from_bytes(
    binary: memoryview, offset: int, size: Any, shape: tuple[int, ...], name: str, where: str
) -> np.ndarray:
    """A BYTES input in the binary part: length-prefixed elements, as over gRPC."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise InvalidArgument(f"{where}.parameters.binary_data_size must be a size >= 0")
    if offset + size > len(binary):
        raise InvalidArgument(
            f"{where} needs {size} binary bytes at offset {offset}, but only {len(binary)} "
            "follow the JSON part"
        )
    return wire.decode_items(binary[offset : offset + size], shape, name)  # a view: no copy


# Which numpy kinds (as parsed from JSON) each datatype kind accepts without losing meaning.
_JSON_KINDS = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}
_JSON_WORDS = {"b": "true/false", "i": "integers", "u": "integers", "f": "numbers"}


def _from_json(data: Any, dtype: np.dtype[Any], shape: tuple[int, ...], where: str) -> np.ndarray:
    if not isinstance(data, list):
        raise InvalidArgument(f"{where}.data must be a list of values (row-major, flat or nested)")
    try:
        parsed = np.array(data)
    except (ValueError, OverflowError):
        raise InvalidArgument(f"{where}.data is a ragged nested list; rows must be equal") from None
    count = math.prod(shape)
    if parsed.size != count:
        raise InvalidArgument(
            f"{where}.data has {parsed.size} values, but shape {list(shape)} needs {count}"
        )
    if count and parsed.dtype.kind not in _JSON_KINDS[dtype.kind]:
        raise InvalidArgument(
            f"{where}.data must hold only {_JSON_WORDS[dtype.kind]} for datatype "
            f"{datatype_of(np.empty(0, dtype))}"
        )
    if dtype.kind in "iu" and count:
        info = np.iinfo(dtype)
        if parsed.min() < info.min or parsed.max() > info.max:
            raise InvalidArgument(f"{where}.data has values outside [{info.min}, {info.max}]")
    return _reshaped(parsed.astype(dtype), shape, where)


def decode_request(doc: Mapping[str, Any], binary: memoryview) -> InferRequest:
    """Inputs, requested outputs and binary choices of an infer request document."""
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidArgument("the request needs 'inputs': a non-empty list of tensors")
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for i, tensor in enumerate(inputs):
        where = f"inputs[{i}]"
        tensor = _object(tensor, where)
        name = tensor.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidArgument(f"{where}.name must be a non-empty string")
        if name in arrays:
            raise InvalidArgument(f"input {shown(name)} appears twice in the request")
        dtype, shape = _dtype(tensor.get("datatype"), where), _shape(tensor.get("shape"), where)
        parameters = _object(tensor.get("parameters"), f"{where}.parameters")
        check_tensor_parameters("input", name, parameters)
        size = parameters.get("binary_data_size")
        if size is not None and "data" in tensor:
            raise InvalidArgument(
                f"{where} has both parameters.binary_data_size and data; send its values one way"
            )
        if dtype is BYTES_DTYPE and size is not None:
            arrays[name] = _bytes_from_bytes(binary, offset, size, shape, name, where)
            offset += size
        elif dtype is BYTES_DTYPE:
            arrays[name] = wire.bytes_array(_strings(tensor.get("data"), where), shape, name)
        elif size is not None:
            arrays[name] = _from_bytes(binary, offset, size, dtype, shape, where)
            offset += size
        else:
            arrays[name] = _from_json(tensor.get("data"), dtype, shape, where)
    if offset != len(binary):
        raise InvalidArgument(
            f"{len(binary)} bytes follow the JSON part, but the inputs' binary_data_size add up "
            f"to {offset}"
        )
    return InferRequest(arrays, *_requested(doc), id=_id(doc))


def _id(doc: Mapping[str, Any]) -> str:
    value = doc.get("id", "")
    if not isinstance(value, str):
        raise InvalidArgument("'id' must be a string")
    return value


def _requested(doc: Mapping[str, Any]) -> tuple[list[str], set[str], bool]:
    params = _object(doc.get("parameters"), "parameters")
    check_request_parameters(params)
    binary_all = params.get("binary_data_output", False)
    if not isinstance(binary_all, bool):
        raise InvalidArgument("parameters.binary_data_output must be true or false")
    outputs = doc.get("outputs", [])
    if not isinstance(outputs, list):
        raise InvalidArgument("'outputs' must be a list of {name, parameters}")
    names: list[str] = []
    binary: set[str] = set()
    for i, output in enumerate(outputs):
        output = _object(output, f"outputs[{i}]")
        name = output.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidArgument(f"outputs[{i}].name must be a non-empty string")
        parameters = _object(output.get("parameters"), f"outputs[{i}].parameters")
        check_requested(name, parameters, names)
        wants = parameters.get("binary_data")
        if wants is None:
            wants = binary_all
        if not isinstance(wants, bool):
            raise InvalidArgument(f"outputs[{i}].parameters.binary_data must be true or false")
        names.append(name)
        if wants:
            binary.add(name)
    return names, binary, binary_all


def encode_response(
    header: Mapping[str, Any], outputs: Sequence[tuple[str, np.ndarray]], binary: set[str]
) -> Body:
    """The response body: JSON with every output, binary ones' bytes after it."""
    entries: list[str] = []
    chunks: list[bytes] = []
    for name, array in outputs:
        strings = wire.is_bytes_array(array)
        entry: dict[str, Any] = {
            "name": name,
            "datatype": wire.BYTES if strings else datatype_of(array),
            "shape": list(array.shape),
        }
        values = ""
        if name in binary:
            data = (
                wire.encode_raw(array)
                if strings
                else np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
            )
            entry["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        elif strings:
            entry["data"] = [_text(item) for item in array.reshape(-1)]
        elif array.dtype.kind == "f" and not np.isfinite(array).all():
            raise InvalidArgument(
                f"output {name!r} holds NaN or infinite values, which JSON cannot carry; ask "
                "for it as binary data (parameters.binary_data) or call over gRPC"
            )
        else:
            values = _json_numbers(array)
        described = json.dumps(entry, separators=(",", ":"))
        entries.append(f'{described[:-1]},"data":{values}}}' if values else described)
    head = json.dumps({**header, "outputs": []}, separators=(",", ":"))
    text = f"{head[:-3]}[{','.join(entries)}]}}".encode()
    if not chunks:
        return Body(text, JSON_TYPE)
    return Body(b"".join([text, *chunks]), BINARY_TYPE, {HEADER_LENGTH: str(len(text))})


# Numbers are written to JSON this many at a time: one call on millions held the GIL, so the
# event loop, for over a second (a 45 KB request asking for a 40 MB answer), even from a thread.
JSON_SLICE_VALUES = 32 * 1024


def _json_numbers(array: np.ndarray) -> str:
    """``array``'s values as a flat JSON list, written slice by slice."""
    flat = array.ravel()
    parts = (
        json.dumps(flat[start : start + JSON_SLICE_VALUES].tolist(), separators=(",", ":"))[1:-1]
        for start in range(0, flat.size, JSON_SLICE_VALUES)
    )
    return f"[{','.join(parts)}]"


def _text(item: Any) -> str:
    return item if isinstance(item, str) else bytes(item).decode("utf-8", errors="replace")
