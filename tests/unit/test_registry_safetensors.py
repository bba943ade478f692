"""The registry's safetensors check: what it refuses before a version commits, and why."""

import json
import struct

import numpy as np
import pytest
from safetensors.numpy import save

from maas.errors import InvalidArgument
from maas.manifest import WEIGHTS_FILE
from services.model_registry.safetensors_check import HeadCapture, check_safetensors

DECLARED = {"w": {"dtype": "float32", "shape": [3, 4]}, "b": {"dtype": "int8", "shape": [4]}}


def weights() -> bytes:
    return save({"w": np.ones((3, 4), np.float32), "b": np.zeros(4, np.int8)})


def head_of(data: bytes, piece: int = 5) -> bytes:
    """The head as the upload pipe captures it: fed in small pieces."""
    capture = HeadCapture()
    for start in range(0, len(data), piece):
        capture.feed(data[start : start + piece])
    return bytes(capture.head)


def forged(header: dict, data: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def test_a_real_file_matching_its_manifest_passes_and_only_its_head_is_kept():
    data = weights()
    head = head_of(data)
    assert len(head) < len(data)
    check_safetensors(WEIGHTS_FILE, head, len(data), DECLARED)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"PK\x03\x04 a zip, e.g. a pickled torch file", "header length"),
        (b"\x01\x00", "too short"),
        (struct.pack("<Q", 4) + b"nope", "not JSON"),
        (forged(["a", "list"]), "not a JSON object"),
        (forged({"w": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}, b"1234"), "dtype"),
        (forged({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"1234"), "shape"),
        (forged({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"1234"), "needs"),
        (forged({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"12345678"), "gap"),
        (forged({"w": {"dtype": "F32", "shape": [1]}}, b"1234"), "data_offsets"),
        (
            forged({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"123456"),
            "padded",
        ),
    ],
    ids=[
        "zip",
        "short",
        "header-not-json",
        "header-list",
        "dtype",
        "negative-dim",
        "span",
        "gap",
        "no-offsets",
        "trailing-bytes",
    ],
)
def test_bytes_that_are_not_safetensors_are_refused_naming_the_problem(data, reason):
    with pytest.raises(InvalidArgument, match=reason):
        check_safetensors("weights.safetensors", head_of(data), len(data), None)


def test_a_truncated_file_is_refused():
    data = weights()[:-3]
    with pytest.raises(InvalidArgument, match="truncated"):
        check_safetensors(WEIGHTS_FILE, head_of(data), len(data), None)


@pytest.mark.parametrize(
    ("declared", "reason"),
    [
        ({**DECLARED, "extra": {"dtype": "float32", "shape": [1]}}, r"missing \['extra'\]"),
        ({"w": DECLARED["w"]}, r"not declared \['b'\]"),
        ({**DECLARED, "w": {"dtype": "float16", "shape": [3, 4]}}, "w is float32"),
        ({**DECLARED, "w": {"dtype": "float32", "shape": [4, 3]}}, r"\[3, 4\] not float32\[4, 3\]"),
    ],
    ids=["missing", "undeclared", "dtype", "shape"],
)
def test_tensors_that_differ_from_the_manifest_are_named(declared, reason):
    data = weights()
    with pytest.raises(InvalidArgument, match=reason):
        check_safetensors(WEIGHTS_FILE, head_of(data), len(data), declared)


def test_a_header_claiming_more_than_the_limit_is_not_buffered():
    capture = HeadCapture()
    capture.feed(struct.pack("<Q", 1 << 40) + b"x" * 100)
    assert len(capture.head) == 108
    with pytest.raises(InvalidArgument, match="header length"):
        check_safetensors("w.safetensors", bytes(capture.head), 1 << 41, None)
