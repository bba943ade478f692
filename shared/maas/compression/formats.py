"""Stored formats of compressed models: plain tensors in safetensors, rebuilt without pickle.

A compressed artifact stores, per tensor of the model's state dict, one of:

- ``<name>``: the tensor itself (fp32, or fp16 under the fp16 codec);
- ``<name>.int8`` + ``<name>.scale``: int8 values and one fp32 scale per output channel;
- ``<name>.mask`` + ``<name>.values`` (or ``.int8`` + ``.scale``): a pruned tensor as a bitmask
  (1 bit per element, ``numpy.packbits`` order) plus only the kept values, so an 80 %-sparse
  tensor costs 0.2 values + 1/8 byte per element instead of 4 bytes.

The shapes come from the zoo: ``arch`` + ``config`` in the manifest rebuild the skeleton, so
the stored tensors need no layout metadata of their own. The format name (``sparse-int8``, ...)
says what the artifact holds; one decoder reads them all, strictly: a missing, unexpected or
mis-sized tensor is an IntegrityError, never a silently half-loaded model.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from maas import zoo
from maas.compression import quant
from maas.compression.quant import Int8Weight
from maas.errors import IntegrityError
from maas.manifest import Manifest

INT8, SCALE, MASK, VALUES = ".int8", ".scale", ".mask", ".values"
FORMATS = ("fp16", "int8", "sparse", "sparse-fp16", "sparse-int8")


def format_name(sparse: bool, codec: str | None) -> str:
    """The manifest format for a variant: ``dense`` when nothing is encoded specially."""
    parts = (["sparse"] if sparse else []) + ([codec] if codec else [])
    return "-".join(parts) or "dense"


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(mask.detach().flatten().numpy().astype(bool)))


def unpack_mask(packed: torch.Tensor, numel: int, name: str) -> torch.Tensor:
    if packed.dtype != torch.uint8 or packed.numel() != (numel + 7) // 8:
        raise IntegrityError(
            f"tensor {name}{MASK} must be {(numel + 7) // 8} uint8 bytes for {numel} elements; "
            f"it is {packed.numel()} x {packed.dtype}"
        )
    return torch.from_numpy(np.unpackbits(packed.numpy(), count=numel).astype(bool))


def encode(
    model: nn.Module, masks: Mapping[str, torch.Tensor], codec: str | None
) -> tuple[str, dict[str, torch.Tensor]]:
    """``(format, stored tensors)`` for a model, its pruning masks and its weight codec."""
    stored = (
        quant.prepare(model, codec)
        if codec
        else {k: v.detach() for k, v in model.state_dict().items()}
    )
    out: dict[str, torch.Tensor] = {}
    for name, tensor in stored.items():
        mask = masks.get(name)
        keep = None if mask is None else mask.flatten()
        if isinstance(tensor, Int8Weight):
            values = tensor.values if keep is None else tensor.values.flatten()[keep]
            out[name + INT8] = values.contiguous()
            out[name + SCALE] = tensor.scale.contiguous()
        elif keep is not None:
            out[name + VALUES] = tensor.flatten()[keep].contiguous()
        else:
            out[name] = tensor.contiguous()
        if mask is not None:
            out[name + MASK] = pack_mask(mask)
    return format_name(bool(masks), codec), out


def _scatter(
    values: torch.Tensor, mask: torch.Tensor | None, like: torch.Tensor, name: str
) -> torch.Tensor:
    """Kept values back into a dense tensor shaped like ``like`` (zeros where pruned)."""
    expected = like.numel() if mask is None else int(mask.sum())
    if (mask is not None and values.dim() != 1) or values.numel() != expected:
        raise IntegrityError(
            f"tensor {name} holds {values.numel()} values; {expected} expected for shape "
            f"{list(like.shape)}"
        )
    if mask is None:
        return values.reshape(like.shape)
    dense = torch.zeros(like.numel(), dtype=values.dtype)
    dense[mask] = values
    return dense.reshape(like.shape)


def decode(
    skeleton: Mapping[str, torch.Tensor], stored: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, Int8Weight]]:
    """Stored tensors -> (dense float state for ``skeleton``'s names, the int8 weights)."""
    dense: dict[str, torch.Tensor] = {}
    int8: dict[str, Int8Weight] = {}
    used: set[str] = set()
    for name, like in skeleton.items():
        mask = None
        if name + MASK in stored:
            mask = unpack_mask(stored[name + MASK], like.numel(), name)
            used.add(name + MASK)
        if name + INT8 in stored:
            values, scale = stored[name + INT8], stored.get(name + SCALE)
            if values.dtype != torch.int8 or scale is None or scale.numel() != like.shape[0]:
                raise IntegrityError(
                    f"tensor {name}{INT8} must be int8 with {like.shape[0]} scales in {name}{SCALE}"
                )
            weight = Int8Weight(_scatter(values, mask, like, name + INT8), scale.float())
            int8[name] = weight
            dense[name] = weight.dequantize()
            used |= {name + INT8, name + SCALE}
        elif mask is not None and name + VALUES in stored:
            dense[name] = _scatter(stored[name + VALUES], mask, like, name + VALUES).to(like.dtype)
            used.add(name + VALUES)
        elif name in stored and mask is None:
            dense[name] = _scatter(stored[name], None, like, name).to(like.dtype)
            used.add(name)
        else:
            raise IntegrityError(f"artifact lacks the tensors for {name!r}")
    unexpected = sorted(set(stored) - used)
    if unexpected:
        raise IntegrityError(f"artifact holds tensors the model has no place for: {unexpected}")
    return dense, int8


def materialize(
    manifest: Manifest, stored: dict[str, torch.Tensor], files: Mapping[str, bytes]
) -> nn.Module:
    """The shared loader's entry for every compressed format (see ``maas.artifacts``)."""
    return rebuild(manifest.arch, manifest.config, stored)


def rebuild(
    arch: str, config: Mapping[str, object], stored: Mapping[str, torch.Tensor]
) -> nn.Module:
    """A runnable module from stored tensors (any format above, dense included)."""
    model = zoo.build(arch, dict(config))
    dense, int8 = decode(model.state_dict(), stored)
    model.load_state_dict(dense, strict=True)
    return quant.convert(model, int8)


def running_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The stored tensors of ``model`` as it runs — its int8 layers as ``.int8`` + ``.scale`` —
    which ``rebuild`` turns back into the same module (no pickle on the way)."""
    int8_layers = {name for name, m in model.named_modules() if isinstance(m, quant.Int8Linear)}
    stored: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        layer, _, leaf = key.rpartition(".")
        if layer in int8_layers and leaf in ("values", "scale"):
            key = f"{layer}.weight{INT8 if leaf == 'values' else SCALE}"
        stored[key] = tensor.detach().contiguous()
    return stored
