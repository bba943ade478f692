"""The model zoo: every architecture the platform can build, from ``{arch, config}`` alone.

A registry version stores only ``arch`` + ``config`` + weights, so building must be
deterministic: the same arch, config and seed give bit-identical initial weights on any machine.
Every model names its final layer ``head`` so fine-tuning can replace it by prefix.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import nn

from maas.errors import InvalidArgument


@dataclass(frozen=True)
class MLPConfig:
    in_features: int = 64
    hidden: tuple[int, ...] = (128, 64)
    num_classes: int = 10
    dropout: float = 0.0


@dataclass(frozen=True)
class CNNConfig:
    in_channels: int = 1
    image_size: int = 8
    channels: tuple[int, ...] = (32, 64)
    num_classes: int = 10


class MLP(nn.Module):
    def __init__(self, config: MLPConfig) -> None:
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        width = config.in_features
        for hidden in config.hidden:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            if config.dropout > 0:
                layers.append(nn.Dropout(config.dropout))
            width = hidden
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, config.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x.reshape(x.shape[0], -1)))


class CNN(nn.Module):
    """3x3 convolutions (1 -> 32 -> 64 by default), one 2x2 max-pool, then a linear head."""

    def __init__(self, config: CNNConfig) -> None:
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        width = config.in_channels
        for channels in config.channels:
            layers += [nn.Conv2d(width, channels, kernel_size=3, padding=1), nn.ReLU()]
            width = channels
        layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        pooled = config.image_size // 2
        self.head = nn.Linear(width * pooled * pooled, config.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, s = self.config.in_channels, self.config.image_size
        # Accept flat rows (N, C*S*S) as the datasets store them, or images (N, C, S, S).
        images = x.reshape(x.shape[0], c, s, s)
        return self.head(self.features(images).flatten(1))


@dataclass(frozen=True)
class Arch:
    name: str
    config_type: type[Any]
    build: Callable[[Any], nn.Module]
    input_shape: Callable[[Any], tuple[int, ...]]
    output_shape: Callable[[Any], tuple[int, ...]] = field(default=lambda c: (c.num_classes,))


ARCHS: dict[str, Arch] = {
    "mlp": Arch("mlp", MLPConfig, MLP, lambda c: (c.in_features,)),
    "cnn": Arch("cnn", CNNConfig, CNN, lambda c: (c.in_channels * c.image_size**2,)),
}


def get_arch(name: str) -> Arch:
    try:
        return ARCHS[name]
    except KeyError:
        raise InvalidArgument(
            f"unknown arch {name!r}; the model zoo has {', '.join(sorted(ARCHS))}"
        ) from None


def parse_config(arch: str, config: dict[str, Any] | None) -> Any:
    """Turn a job's/manifest's config map into the arch's config dataclass, naming bad keys."""
    spec = get_arch(arch)
    config = dict(config or {})
    known = {f.name: f for f in fields(spec.config_type)}
    unknown = sorted(set(config) - set(known))
    if unknown:
        raise InvalidArgument(
            f"model.config has unknown keys {unknown} for arch {arch!r}; known: {sorted(known)}"
        )
    for key, value in config.items():
        if isinstance(value, list):
            config[key] = tuple(value)
    try:
        parsed = spec.config_type(**config)
    except TypeError as exc:
        raise InvalidArgument(f"model.config for arch {arch!r} is invalid: {exc}") from None
    for key, value in asdict(parsed).items():
        values = value if isinstance(value, tuple) else (value,)
        if any(isinstance(v, int | float) and not isinstance(v, bool) and v < 0 for v in values):
            raise InvalidArgument(f"model.config.{key}={value!r} must not be negative")
    return parsed


def config_to_dict(config: Any) -> dict[str, Any]:
    """JSON-friendly form of a config dataclass (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}


def build(arch: str, config: dict[str, Any] | None = None, seed: int = 0) -> nn.Module:
    """Build ``arch`` with deterministic initial weights for ``seed``."""
    spec = get_arch(arch)
    parsed = parse_config(arch, config)
    # Seeding a private RNG scope keeps building a model from disturbing the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = spec.build(parsed)
    return model


def build_skeleton(arch: str, config: dict[str, Any] | None = None) -> nn.Module:
    """``arch`` with parameters on the meta device: no memory, no init; load weights with
    ``load_state_dict(state, assign=True)``. Loading a stored model this way skips a random
    initialisation that would be overwritten anyway."""
    spec = get_arch(arch)
    parsed = parse_config(arch, config)
    with torch.device("meta"):
        return spec.build(parsed)


def input_shape(arch: str, config: dict[str, Any] | None = None) -> tuple[int, ...]:
    """Shape of one input row, without the batch dimension (what inference advertises)."""
    return tuple(get_arch(arch).input_shape(parse_config(arch, config)))


def output_shape(arch: str, config: dict[str, Any] | None = None) -> tuple[int, ...]:
    return tuple(get_arch(arch).output_shape(parse_config(arch, config)))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
