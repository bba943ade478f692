"""Gradient codecs: how a worker's partition gradient travels to its aggregator shard.

Each codec turns a flat fp32 gradient into a msgpack-ready map of ``maas.codec`` tensors and back
into a ``DenseGradient`` or ``SparseGradient`` that the aggregator adds straight into its sum
(no dense fp32 copy of a compressed gradient is ever made on the aggregator).

- ``none``: fp32 as is.            - ``fp16``: half precision (clipped to the fp16 range).
- ``int8``: one scale per partition, ``round(g / scale)`` with ``scale = max|g| / 127``.
- ``topk(ratio)``: the ``ceil(ratio * n)`` largest magnitudes as (uint32 index, fp32 value).

Lossy codecs (int8, topk) are used through ``ErrorFeedback`` on the worker: what the codec
dropped this step is added to the next step's gradient, so nothing is lost, only delayed
(Seide et al. 2014; Stich et al. 2018). Pure numpy + BLAS: the aggregator runs without torch.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from scipy.linalg.blas import saxpy

from maas.codec import map_to_tensor, tensor_to_map
from maas.errors import InvalidArgument

FP16_MAX = 65504.0
DEFAULT_TOPK_RATIO = 0.01
_BLOCK = 1 << 16  # elements converted to fp32 at a time: stays in cache, needs no big temporary
_SAMPLE = 16_384  # magnitudes sampled to guess the top-k threshold
_TOPK = re.compile(r"^topk(?:\((?P<ratio>[0-9.]+)\))?$")


# numpy casts fp16 <-> fp32 element by element in software here (its F16C path needs AVX-512),
# and slowest on the subnormal values small gradients are full of: fp16 -> fp32 goes through a
# 256 KiB table instead (exact; 3x faster on gradients), and fp32 -> fp16 through torch where
# torch is loaded (workers, which encode gradients: ~150x faster), numpy elsewhere (the shard's
# fp16 broadcast of parameters, which are rarely subnormal).
_HALF_TO_FLOAT = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)


def widen(half: np.ndarray, out: np.ndarray) -> None:
    """``out[:] = half`` (fp16 -> fp32, exact)."""
    np.take(_HALF_TO_FLOAT, half.view(np.dtype("<u2")), out=out)


def half_precision(values: np.ndarray) -> np.ndarray:
    """An fp16 copy of ``values``, clipped to the fp16 range (NaN stays NaN)."""
    half = np.empty(values.shape, dtype=np.float16)
    torch = sys.modules.get("torch")
    if torch is None:
        np.clip(values, -FP16_MAX, FP16_MAX, out=half, casting="same_kind")
        return half
    # Rounded first, then clipped: what rounds to infinity is clipped to the fp16 maximum, like
    # what numpy clips first (everything from 65520 up rounds to infinity).
    out = torch.from_numpy(half)
    out.copy_(torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)))
    out.clamp_(-FP16_MAX, FP16_MAX)
    return half


def _to_float(x: np.ndarray, out: np.ndarray) -> None:
    if x.dtype == np.float16:
        widen(x, out)
    else:
        np.copyto(out, x, casting="unsafe")


def axpy(target: np.ndarray, x: np.ndarray, alpha: float) -> None:
    """``target += alpha * x`` in one pass over memory (BLAS saxpy for fp32 inputs). An fp32
    ``x`` that is not 4-byte aligned (a view into a received frame) goes through the blocked
    path: saxpy's wrapper would copy all of it first (8x slower here for 2 MB)."""
    if x.dtype == np.float32 and x.flags.aligned:
        out = saxpy(x, target, a=alpha)
        if out is not target:  # saxpy works in place on a contiguous fp32 target
            target[...] = out
        return
    block = np.empty(min(_BLOCK, len(x)), dtype=np.float32)
    for start in range(0, len(x), _BLOCK):
        part = x[start : start + _BLOCK]
        _to_float(part, block[: len(part)])
        axpy(target[start : start + len(part)], block[: len(part)], alpha)


def scaled_copy(target: np.ndarray, x: np.ndarray, alpha: float) -> None:
    """``target[:] = alpha * x`` in one pass (two for fp16)."""
    if x.dtype == np.float16:
        widen(x, target)
        if alpha != 1.0:
            target *= np.float32(alpha)
    elif alpha == 1.0:
        np.copyto(target, x, casting="unsafe")
    else:
        np.multiply(x, np.float32(alpha), out=target, casting="unsafe")


@dataclass(frozen=True)
class DenseGradient:
    """``scale * values`` with values in fp32, fp16 or int8."""

    values: np.ndarray
    scale: float = 1.0

    @property
    def size(self) -> int:
        return len(self.values)

    def add_to(self, target: np.ndarray, alpha: float = 1.0) -> None:
        axpy(target, self.values, alpha * self.scale)

    def write_to(self, target: np.ndarray, alpha: float = 1.0) -> None:
        scaled_copy(target, self.values, alpha * self.scale)


@dataclass(frozen=True)
class SparseGradient:
    """A vector of ``size`` zeros except ``values`` at the (unique) ``indices``."""

    indices: np.ndarray
    values: np.ndarray
    size: int

    def add_to(self, target: np.ndarray, alpha: float = 1.0) -> None:
        # Indices are unique (top-k never repeats one), so fancy-index += is exact.
        target[self.indices] += np.float32(alpha) * self.values

    def write_to(self, target: np.ndarray, alpha: float = 1.0) -> None:
        target.fill(0.0)
        target[self.indices] = np.float32(alpha) * self.values


@dataclass(frozen=True)
class PiecewiseGradient:
    """A partition's gradient as it arrived: pieces at partition offsets, each a view over its
    message. Dense pieces are disjoint and cover the partition; sparse ones may share a range."""

    parts: tuple[tuple[int, DenseGradient | SparseGradient], ...]
    size: int

    def add_to(self, target: np.ndarray, alpha: float = 1.0) -> None:
        for offset, part in self.parts:
            part.add_to(target[offset : offset + part.size], alpha)

    def write_to(self, target: np.ndarray, alpha: float = 1.0) -> None:
        dense = all(isinstance(p, DenseGradient) for _, p in self.parts)
        if dense and sum(p.size for _, p in self.parts) == self.size:
            for offset, part in self.parts:
                part.write_to(target[offset : offset + part.size], alpha)
            return
        target.fill(0.0)
        self.add_to(target, alpha)


Decoded = DenseGradient | SparseGradient | PiecewiseGradient


class GradientCodec(Protocol):
    name: str
    lossy: bool

    def encode(self, grad: np.ndarray) -> dict[str, Any]: ...

    def decode(self, payload: Mapping[str, Any], size: int) -> Decoded: ...

    def wire_bytes(self, size: int) -> int:
        """About how many bytes ``size`` gradient values take once encoded."""
        ...


def _tensor(payload: Mapping[str, Any], key: str, dtype: str, size: int | None) -> np.ndarray:
    if not isinstance(payload, Mapping) or key not in payload:
        raise InvalidArgument(f"gradient payload lacks tensor {key!r}")
    array = map_to_tensor(payload[key])
    if array.dtype.name != dtype or array.ndim != 1:
        raise InvalidArgument(
            f"gradient payload {key!r} must be a 1-D {dtype} tensor, got {array.dtype.name} "
            f"shape {list(array.shape)}"
        )
    if size is not None and len(array) != size:
        raise InvalidArgument(
            f"gradient payload {key!r} has {len(array)} values, the partition has {size}"
        )
    return array


@dataclass(frozen=True)
class NoneCodec:
    name: str = "none"
    lossy: bool = False

    def encode(self, grad: np.ndarray) -> dict[str, Any]:
        return {"values": tensor_to_map(np.asarray(grad, dtype=np.float32))}

    def decode(self, payload: Mapping[str, Any], size: int) -> Decoded:
        return DenseGradient(_tensor(payload, "values", "float32", size))

    def wire_bytes(self, size: int) -> int:
        return 4 * size


@dataclass(frozen=True)
class Fp16Codec:
    name: str = "fp16"
    lossy: bool = False  # rounding error is ~1e-3 relative; not worth a feedback pass

    def encode(self, grad: np.ndarray) -> dict[str, Any]:
        return {"values": tensor_to_map(half_precision(grad))}

    def decode(self, payload: Mapping[str, Any], size: int) -> Decoded:
        return DenseGradient(_tensor(payload, "values", "float16", size))

    def wire_bytes(self, size: int) -> int:
        return 2 * size


@dataclass(frozen=True)
class Int8Codec:
    name: str = "int8"
    lossy: bool = True

    def encode(self, grad: np.ndarray) -> dict[str, Any]:
        peak = float(max(grad.max(initial=0.0), -grad.min(initial=0.0)))
        scale = peak / 127.0 if peak > 0 else 1.0
        scaled = np.multiply(grad, np.float32(1.0 / scale), dtype=np.float32)
        np.rint(scaled, out=scaled)
        return {"values": tensor_to_map(scaled.astype(np.int8)), "scale": scale}

    def decode(self, payload: Mapping[str, Any], size: int) -> Decoded:
        scale = payload.get("scale") if isinstance(payload, Mapping) else None
        if not isinstance(scale, int | float) or not math.isfinite(scale) or scale <= 0:
            raise InvalidArgument(f"int8 gradient needs a positive finite 'scale', got {scale!r}")
        return DenseGradient(_tensor(payload, "values", "int8", size), float(scale))

    def wire_bytes(self, size: int) -> int:
        return size


def top_indices(magnitudes: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest values (ties broken arbitrarily), in about one pass.

    A threshold from a strided sample keeps a candidate set that, when it has at least ``k``
    members, provably holds the top ``k`` (everything outside is below every candidate), so
    only the candidates are partitioned; otherwise fall back to partitioning everything.
    """
    n = len(magnitudes)
    stride = n // _SAMPLE
    if stride >= 2:
        sample = magnitudes[::stride]
        # Aim for ~2k candidates so sampling noise rarely leaves fewer than k.
        rank = max(0, len(sample) - 1 - (2 * k * len(sample)) // n)
        threshold = np.partition(sample, rank)[rank]
        candidates = np.flatnonzero(magnitudes >= threshold)
        if len(candidates) >= k:
            chosen = np.argpartition(magnitudes[candidates], len(candidates) - k)
            return candidates[chosen[len(candidates) - k :]]
    return np.argpartition(magnitudes, n - k)[n - k :]


@dataclass(frozen=True)
class TopKCodec:
    ratio: float = DEFAULT_TOPK_RATIO
    lossy: bool = True

    @property
    def name(self) -> str:
        return f"topk({self.ratio:g})"

    def keep(self, size: int) -> int:
        return min(size, max(1, math.ceil(self.ratio * size)))

    def wire_bytes(self, size: int) -> int:
        return 8 * self.keep(size)  # a uint32 index and an fp32 value each

    def encode(self, grad: np.ndarray) -> dict[str, Any]:
        k = self.keep(len(grad))
        if k == len(grad):
            indices = np.arange(len(grad), dtype=np.uint32)
        else:
            indices = np.sort(top_indices(np.abs(grad), k)).astype(np.uint32)
        values = np.ascontiguousarray(grad[indices], dtype=np.float32)
        return {"indices": tensor_to_map(indices), "values": tensor_to_map(values)}

    def decode(self, payload: Mapping[str, Any], size: int) -> Decoded:
        indices = _tensor(payload, "indices", "uint32", None)
        values = _tensor(payload, "values", "float32", len(indices))
        if len(indices) and int(indices.max()) >= size:
            raise InvalidArgument(
                f"top-k gradient index {int(indices.max())} is outside the partition of {size}"
            )
        if len(np.unique(indices)) != len(indices):
            raise InvalidArgument("top-k gradient indices must be unique")
        return SparseGradient(indices, values, size)


GradientCodecType = NoneCodec | Fp16Codec | Int8Codec | TopKCodec


def parse_codec(spec: str) -> GradientCodecType:
    """``none | fp16 | int8 | topk | topk(ratio)`` -> codec; names the accepted forms if bad."""
    if spec == "none":
        return NoneCodec()
    if spec == "fp16":
        return Fp16Codec()
    if spec == "int8":
        return Int8Codec()
    match = _TOPK.match(spec)
    if match:
        raw = match.group("ratio")
        try:
            ratio = float(raw) if raw is not None else DEFAULT_TOPK_RATIO
        except ValueError:
            ratio = -1.0
        if 0 < ratio <= 1:
            return TopKCodec(ratio)
    raise InvalidArgument(
        f"training.gradient_codec={spec!r} is unknown; use none, fp16, int8 or topk(ratio) "
        "with 0 < ratio <= 1, e.g. topk(0.01)"
    )


class ErrorFeedback:
    """Worker-side encoder that carries what a lossy codec dropped into the next step."""

    def __init__(self, codec: GradientCodecType) -> None:
        self.codec = codec
        self._residual: np.ndarray | None = None

    @property
    def residual(self) -> np.ndarray | None:
        return self._residual

    def encode(self, grad: np.ndarray) -> dict[str, Any]:
        if not self.codec.lossy:
            return self.codec.encode(grad)
        if self._residual is None or len(self._residual) != len(grad):
            self._residual = np.zeros(len(grad), dtype=np.float32)
        corrected = self._residual  # corrected in place: one buffer for the job's whole run
        corrected += grad
        payload = self.codec.encode(corrected)
        # What was sent is taken out in place: `corrected` becomes exactly what was dropped.
        if isinstance(self.codec, TopKCodec):
            # The values sent are the corrected ones at those indices: what is left there is 0.
            corrected[map_to_tensor(payload["indices"])] = 0.0
        else:
            self.codec.decode(payload, len(corrected)).add_to(corrected, -1.0)
        return payload
