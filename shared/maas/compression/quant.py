"""Weight quantization behind our own small interface: prepare -> convert -> pack/unpack.

``torch.ao.quantization`` is deprecated upstream with its removal announced, so nothing here
imports it. ``prepare`` turns float weights into stored tensors (int8 values with one symmetric
scale per output channel, or fp16), ``convert`` builds a runnable module from them, and the
format module packs/unpacks those tensors to safetensors. Only ``Int8Linear`` touches a kernel,
so moving to torchao later changes one class.

Why these choices (measured in bench/compress.py on this CPU):
- Linear layers run ``torch.ops.quantized.linear_dynamic`` (ATen's fbgemm/onednn kernel, the one
  ``quantize_dynamic`` also ends up in): activations are quantized per batch at run time, so no
  calibration data is needed, and int8 matmuls are several times faster than fp32 ones.
- Conv layers store int8 too but compute in fp32 on dequantized weights: the artifact shrinks
  and no static activation calibration is needed.
- fp16 is a storage format: CPU fp16 matmuls are slower than fp32, so weights are widened at load.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from maas.errors import InvalidArgument

DTYPES = ("int8", "fp16")
INT8_MAX = 127  # symmetric range [-127, 127]: zero is exact and negation never overflows
# Linear weights stay within [-64, 64] so full-range (8-bit) activations are exact on every CPU:
# AVX2's int8 kernels add two u8*s8 products in int16 (vpmaddubsw saturates), and 2 * 255 * 64
# still fits. One weight bit is far cheaper than one activation bit (measured on MiniLM: cosine to
# fp32 0.992 this way, 0.975 with 127-weights and 7-bit activations).
LINEAR_MAX = 32767 // (2 * 255)
QUANTIZABLE = (nn.Linear, nn.Conv2d)


@dataclass(frozen=True)
class Int8Weight:
    """int8 values plus one fp32 scale per output channel: ``weight ≈ values * scale``."""

    values: torch.Tensor  # int8, the weight's shape
    scale: torch.Tensor  # float32, (out_channels,)

    def dequantize(self) -> torch.Tensor:
        shape = (-1,) + (1,) * (self.values.dim() - 1)
        return self.values.float() * self.scale.reshape(shape)


def quantize_int8(weight: torch.Tensor, limit: int = INT8_MAX) -> Int8Weight:
    """Per-output-channel symmetric int8 quantization of one weight tensor to [-limit, limit]."""
    rows = weight.detach().float().reshape(weight.shape[0], -1)
    scale = rows.abs().amax(dim=1) / limit
    # An all-zero channel (a pruned neuron) gets scale 1 so nothing divides by zero.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    values = torch.round(rows / scale[:, None]).clamp_(-limit, limit).to(torch.int8)
    return Int8Weight(values.reshape(weight.shape), scale)


def int8_limits(model: nn.Module) -> dict[str, int]:
    """State-dict names of the weights quantization acts on (Linear, Conv2d), each with its
    int8 range."""
    return {
        f"{name}.weight" if name else "weight": (
            LINEAR_MAX if isinstance(module, nn.Linear) else INT8_MAX
        )
        for name, module in model.named_modules()
        if isinstance(module, QUANTIZABLE)
    }


def quantizable_weights(model: nn.Module) -> list[str]:
    """State-dict names of the weights quantization and pruning act on (Linear, Conv2d)."""
    return list(int8_limits(model))


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise InvalidArgument(f"quantize.dtype={dtype!r} is not supported; use one of {DTYPES}")
    return dtype


def prepare(model: nn.Module, dtype: str) -> dict[str, torch.Tensor | Int8Weight]:
    """The stored form of ``model``'s state: int8 layer weights, or every float tensor in fp16.

    Tensors that stay as they are (biases under int8) are returned unchanged.
    """
    check_dtype(dtype)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if dtype == "fp16":
        return {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    limits = int8_limits(model)
    return {k: quantize_int8(v, limits[k]) if k in limits else v for k, v in state.items()}


class Int8Linear(nn.Module):
    """A Linear layer computing with int8 weights and per-batch dynamically quantized inputs."""

    def __init__(self, weight: Int8Weight, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features = int(weight.values.shape[1])
        self.out_features = int(weight.values.shape[0])
        # Kept as buffers so the module still shows what it computes with; the kernel uses the
        # prepacked form, which is built once here (packing per call would cost more than it saves).
        self.register_buffer("values", weight.values)
        self.register_buffer("scale", weight.scale)
        self.register_buffer("bias", None if bias is None else bias.detach().float())
        with warnings.catch_warnings():
            # The prepack API takes a quantized-dtype tensor, whose creation functions now warn
            # about their own deprecation; this one call is the only place we make one.
            warnings.filterwarnings(
                "ignore", message=".*quantized tensor creation", category=UserWarning
            )
            qweight = torch._make_per_channel_quantized_tensor(
                weight.values,
                weight.scale.double(),
                torch.zeros(self.out_features, dtype=torch.long),
                0,
            )
        self._packed = torch.ops.quantized.linear_prepack(qweight, self.bias)
        # Weights beyond LINEAR_MAX (artifacts quantized before it existed) need 7-bit
        # activations to keep AVX2's int16 pair sums from saturating.
        self._reduce_range = bool((weight.values.abs() > LINEAR_MAX).any())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x.float(), self._packed, self._reduce_range)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"

    def stored(self) -> tuple[Int8Weight, torch.Tensor | None]:
        """The int8 weight and the fp32 bias this layer computes with."""
        bias = self.bias
        weight = Int8Weight(self.get_buffer("values"), self.get_buffer("scale"))
        return weight, bias if isinstance(bias, torch.Tensor) else None

    @classmethod
    def side_by_side(cls, layers: Sequence[Int8Linear]) -> Int8Linear:
        """One layer whose output is ``layers``' outputs concatenated, for layers that read the
        same input: that input is then quantized once, not once per layer. The result is
        bit-identical (the activation scale is per tensor, so every layer saw the same one)."""
        parts = [layer.stored() for layer in layers]
        weight = Int8Weight(
            torch.cat([w.values for w, _ in parts]), torch.cat([w.scale for w, _ in parts])
        )
        if all(b is None for _, b in parts):
            return cls(weight, None)
        bias = [torch.zeros(w.values.shape[0]) if b is None else b for w, b in parts]
        return cls(weight, torch.cat(bias))


def convert(model: nn.Module, int8: dict[str, Int8Weight]) -> nn.Module:
    """Swap every Linear whose weight is in ``int8`` for an ``Int8Linear`` (in place).

    ``model`` must already hold the dequantized weights (so Conv layers, which keep computing in
    fp32, see exactly the stored int8 values).
    """
    for name, module in list(model.named_modules()):
        if name and isinstance(module, nn.Linear) and f"{name}.weight" in int8:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, Int8Linear(int8[f"{name}.weight"], module.bias))
    return model
