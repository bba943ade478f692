"""Gradient codecs: what survives the wire, and error feedback."""

from __future__ import annotations

import importlib
import sys

import msgpack
import numpy as np
import pytest

from maas.codec import tensor_to_map
from maas.errors import InvalidArgument
from maas.training.codecs import (
    FP16_MAX,
    DenseGradient,
    ErrorFeedback,
    Int8Codec,
    NoneCodec,
    SparseGradient,
    TopKCodec,
    axpy,
    half_precision,
    parse_codec,
    top_indices,
    widen,
)


def _grad(n: int = 10_000, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=n).astype(np.float32)


def _wire(payload: dict) -> dict:
    return msgpack.unpackb(msgpack.packb(payload, use_bin_type=True), raw=False)


def _dense(codec_spec: str, grad: np.ndarray) -> np.ndarray:
    codec = parse_codec(codec_spec)
    out = np.zeros_like(grad)
    codec.decode(_wire(codec.encode(grad)), len(grad)).add_to(out)
    return out


def test_none_is_exact() -> None:
    grad = _grad()
    np.testing.assert_array_equal(_dense("none", grad), grad)


def test_fp16_is_within_half_precision() -> None:
    grad = _grad()
    np.testing.assert_allclose(_dense("fp16", grad), grad, rtol=1e-3, atol=1e-4)


def test_fp16_clips_instead_of_overflowing_to_inf() -> None:
    out = _dense("fp16", np.array([1e6, -1e6, 1.0], dtype=np.float32))
    assert np.isfinite(out).all() and out[0] == 65504.0


def test_int8_error_is_at_most_half_a_step() -> None:
    grad = _grad()
    step = np.abs(grad).max() / 127
    assert np.abs(_dense("int8", grad) - grad).max() <= step / 2 + 1e-6


def test_int8_of_a_zero_gradient_is_zero() -> None:
    grad = np.zeros(100, dtype=np.float32)
    np.testing.assert_array_equal(_dense("int8", grad), grad)


def test_topk_sends_exactly_the_largest_magnitudes() -> None:
    grad = _grad(1000)
    payload = TopKCodec(0.01).encode(grad)
    decoded = TopKCodec(0.01).decode(_wire(payload), 1000)
    assert isinstance(decoded, SparseGradient)
    expected = np.sort(np.argsort(-np.abs(grad))[:10])
    np.testing.assert_array_equal(decoded.indices, expected)
    np.testing.assert_array_equal(decoded.values, grad[expected])


@pytest.mark.parametrize("k", [1, 40, 400, 4000])
def test_top_indices_finds_the_largest_even_with_many_ties(k: int) -> None:
    rng = np.random.default_rng(k)
    magnitudes = np.abs(rng.normal(size=200_000)).astype(np.float32)
    magnitudes[rng.random(200_000) < 0.7] = 0.0  # dead ReLU units: most gradients are zero
    chosen = top_indices(magnitudes, k)
    assert len(np.unique(chosen)) == k
    assert magnitudes[chosen].min() >= np.sort(magnitudes)[-k]


def test_topk_bytes_shrink_with_the_ratio() -> None:
    grad = _grad(100_000)
    dense = len(msgpack.packb(NoneCodec().encode(grad), use_bin_type=True))
    sparse = len(msgpack.packb(TopKCodec(0.004).encode(grad), use_bin_type=True))
    assert dense / sparse > 100


def test_write_to_overwrites_what_was_there() -> None:
    grad = _grad(50)
    codec = TopKCodec(0.1)
    out = np.full(50, 7.0, dtype=np.float32)
    codec.decode(codec.encode(grad), 50).write_to(out, 2.0)
    assert np.count_nonzero(out) == 5


@pytest.mark.parametrize("spec", ["int8", "topk(0.01)"])
def test_error_feedback_delivers_everything_eventually(spec: str) -> None:
    codec = parse_codec(spec)
    feedback = ErrorFeedback(codec)
    sent = np.zeros(2000, dtype=np.float32)
    total = np.zeros(2000, dtype=np.float32)
    for step in range(30):
        grad = _grad(2000, seed=step)
        total += grad
        codec.decode(_wire(feedback.encode(grad)), 2000).add_to(sent)
    # Invariant: what was sent plus what is still held back is exactly what was computed.
    assert feedback.residual is not None
    np.testing.assert_allclose(sent + feedback.residual, total, atol=1e-4)


def test_lossless_codecs_keep_no_residual() -> None:
    feedback = ErrorFeedback(parse_codec("fp16"))
    feedback.encode(_grad())
    assert feedback.residual is None


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("none", "none"),
        ("fp16", "fp16"),
        ("int8", "int8"),
        ("topk", "topk(0.01)"),
        ("topk(0.001)", "topk(0.001)"),
    ],
)
def test_parse_codec_accepts_the_documented_names(spec: str, expected: str) -> None:
    assert parse_codec(spec).name == expected


@pytest.mark.parametrize("spec", ["gzip", "topk(0)", "topk(2)", "topk()", "int4"])
def test_parse_codec_names_the_field_and_the_choices(spec: str) -> None:
    with pytest.raises(InvalidArgument, match="training.gradient_codec"):
        parse_codec(spec)


def test_decode_refuses_a_payload_of_the_wrong_size() -> None:
    with pytest.raises(InvalidArgument, match="partition has 5"):
        NoneCodec().decode(NoneCodec().encode(_grad(4)), 5)


def test_decode_refuses_a_payload_of_the_wrong_dtype() -> None:
    with pytest.raises(InvalidArgument, match="int8"):
        Int8Codec().decode({"values": tensor_to_map(_grad(4)), "scale": 1.0}, 4)


def test_decode_refuses_int8_without_a_scale() -> None:
    payload = Int8Codec().encode(_grad(4))
    payload.pop("scale")
    with pytest.raises(InvalidArgument, match="scale"):
        Int8Codec().decode(payload, 4)


def test_topk_decode_refuses_an_index_outside_the_partition() -> None:
    payload = {
        "indices": tensor_to_map(np.array([3, 9], dtype=np.uint32)),
        "values": tensor_to_map(np.ones(2, dtype=np.float32)),
    }
    with pytest.raises(InvalidArgument, match="outside the partition"):
        TopKCodec().decode(payload, 5)


def test_topk_decode_refuses_repeated_indices() -> None:
    payload = {
        "indices": tensor_to_map(np.array([1, 1], dtype=np.uint32)),
        "values": tensor_to_map(np.ones(2, dtype=np.float32)),
    }
    with pytest.raises(InvalidArgument, match="unique"):
        TopKCodec().decode(payload, 5)


def test_axpy_accepts_read_only_and_low_precision_inputs() -> None:
    target = np.ones(200_000, dtype=np.float32)
    x = np.frombuffer(np.full(200_000, 2, dtype=np.int8).tobytes(), dtype=np.int8)
    axpy(target, x, 0.5)
    np.testing.assert_array_equal(target, np.full(200_000, 2.0, dtype=np.float32))


def test_axpy_of_an_unaligned_fp32_view_equals_the_aligned_result() -> None:
    values = np.random.default_rng(2).normal(size=150_000).astype(np.float32)
    frame = b"k" + values.tobytes()  # values at offset 1, as in a received frame
    unaligned = np.frombuffer(frame, dtype="<f4", offset=1)
    assert not unaligned.flags.aligned
    expected, got = np.ones_like(values), np.ones_like(values)
    axpy(expected, values, 0.25)
    axpy(got, unaligned, 0.25)
    np.testing.assert_array_equal(got, expected)


def _every_magnitude(seed: int = 0) -> np.ndarray:
    """fp32 values from 1e-12 to 1e6 (fp16 subnormals, normals, overflow), and the specials."""
    rng = np.random.default_rng(seed)
    scale = np.float32(10.0) ** rng.integers(-12, 7, 20_000).astype(np.float32)
    values = (rng.standard_normal(20_000).astype(np.float32) * scale).astype(np.float32)
    specials = [0.0, -0.0, np.inf, -np.inf, np.nan, 65504, 65519, 65520, -7e4, 6e-8, 2.9e-8]
    return np.concatenate([values, np.array(specials, dtype=np.float32)])


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.all((a.view(np.uint16) == b.view(np.uint16)) | (np.isnan(a) & np.isnan(b))))


@pytest.mark.parametrize("torch_loaded", [True, False])
def test_half_precision_rounds_and_clips_like_numpy(
    torch_loaded: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if torch_loaded:
        importlib.import_module("torch")  # the worker's case
    else:
        monkeypatch.setitem(sys.modules, "torch", None)  # the shard's case: numpy only
    values = _every_magnitude()
    with np.errstate(invalid="ignore"):
        expected = np.clip(values, -FP16_MAX, FP16_MAX).astype(np.float16)
    assert _same_bits(half_precision(values), expected)


def test_widen_is_numpys_exact_cast() -> None:
    half = np.arange(1 << 16, dtype=np.uint16).view(np.float16)  # every fp16 value
    out = np.empty(len(half), dtype=np.float32)
    widen(half, out)
    assert np.array_equal(out, half.astype(np.float32), equal_nan=True)


def test_an_fp16_gradient_adds_its_exact_fp32_values() -> None:
    finite = _every_magnitude(1)[:20_000]
    half = np.clip(finite, -FP16_MAX, FP16_MAX).astype(np.float16)
    target = np.ones(len(half), dtype=np.float32)
    DenseGradient(half).add_to(target, 0.5)
    assert np.array_equal(target, np.float32(1.0) + np.float32(0.5) * half.astype(np.float32))
