"""Pruning: global magnitude (unstructured) and whole neurons/channels by L2 norm (structured).

Unstructured pruning returns keep-masks over the Linear/Conv weights; the model keeps its shape
and the stored format saves only the kept values (see ``formats``). Structured pruning removes
whole hidden units and returns a genuinely smaller dense model of the same arch, with the
narrower widths in its config, so it runs faster without any sparse kernel.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from maas import zoo
from maas.compression.quant import quantizable_weights
from maas.errors import InvalidArgument

Masks = dict[str, torch.Tensor]

# The config field holding the hidden widths structured pruning narrows, per arch.
WIDTH_FIELDS = {"mlp": "hidden", "cnn": "channels"}


def check_sparsity(sparsity: float) -> float:
    if not 0 <= sparsity < 1:
        raise InvalidArgument(f"prune.sparsity={sparsity!r} must be in [0, 1)")
    return float(sparsity)


def magnitude_masks(model: nn.Module, sparsity: float) -> Masks:
    """Keep-masks pruning the ``sparsity`` fraction of smallest-|w| weights across all layers.

    One global threshold (not per layer) lets layers with many redundant weights give up more.
    """
    check_sparsity(sparsity)
    state = model.state_dict()
    names = quantizable_weights(model)
    flat = torch.cat([state[name].detach().abs().flatten() for name in names])
    keep_count = flat.numel() - round(sparsity * flat.numel())
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[torch.topk(flat, keep_count, sorted=False).indices] = True
    masks: Masks = {}
    offset = 0
    for name in names:
        numel = state[name].numel()
        masks[name] = keep[offset : offset + numel].reshape(state[name].shape)
        offset += numel
    return masks


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Masks) -> None:
    """Zero the pruned weights in place (after pruning and after every fine-tuning step)."""
    state = model.state_dict()
    for name, mask in masks.items():
        state[name].mul_(mask)


def _layers(model: nn.Module) -> list[nn.Linear | nn.Conv2d]:
    # Registration order is data-flow order in every zoo arch: hidden layers first, head last.
    return [m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]


def _keep_units(layer: nn.Linear | nn.Conv2d, fraction: float) -> torch.Tensor:
    """Indices (ascending) of the output units with the largest L2 weight norm."""
    norms = layer.weight.detach().reshape(layer.weight.shape[0], -1).norm(dim=1)
    count = max(1, round(norms.numel() * (1 - fraction)))
    return torch.topk(norms, count).indices.sort().values


def _slice_inputs(weight: torch.Tensor, keep: torch.Tensor, previous_units: int) -> torch.Tensor:
    """Keep the input columns/channels fed by the kept units of the previous layer."""
    if weight.dim() == 4:  # conv: input channels are dim 1
        return weight[:, keep]
    # Linear after a conv sees each channel as a block of flattened positions (channel-major).
    per_unit = weight.shape[1] // previous_units
    blocks = weight.reshape(weight.shape[0], previous_units, per_unit)
    return blocks[:, keep].reshape(weight.shape[0], -1)


def check_structured(arch: str) -> None:
    """InvalidArgument unless structured pruning knows how to narrow ``arch``."""
    if arch != "bert" and arch not in WIDTH_FIELDS:
        raise InvalidArgument(
            f"structured pruning knows archs {sorted([*WIDTH_FIELDS, 'bert'])}, not {arch!r}"
        )


@torch.no_grad()
def structured(
    model: nn.Module, arch: str, config: dict[str, Any], fraction: float
) -> tuple[nn.Module, dict[str, Any]]:
    """Remove ``fraction`` of every hidden layer's units; returns (smaller model, its config)."""
    check_sparsity(fraction)
    check_structured(arch)
    if arch == "bert":  # attention heads and FFN channels, per layer (maas.text.compress)
        from maas.text.compress import prune_structured

        return prune_structured(model, fraction)
    field = WIDTH_FIELDS[arch]
    layers = _layers(model)
    keeps = [_keep_units(layer, fraction) for layer in layers[:-1]]
    parsed = zoo.config_to_dict(zoo.parse_config(arch, config))
    small_config = {**parsed, field: [int(k.numel()) for k in keeps]}
    small = zoo.build(arch, small_config)
    for i, (old, new) in enumerate(zip(layers, _layers(small), strict=True)):
        weight = old.weight
        if i > 0:
            weight = _slice_inputs(weight, keeps[i - 1], layers[i - 1].weight.shape[0])
        bias = old.bias
        if i < len(keeps):
            weight, bias = weight[keeps[i]], None if bias is None else bias[keeps[i]]
        new.weight.copy_(weight)
        if bias is not None and new.bias is not None:
            new.bias.copy_(bias)
    return small.eval(), small_config
