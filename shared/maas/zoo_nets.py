"""The torch modules behind the zoo's archs. Only ``maas.zoo.build*`` imports this module, so
judging a job or describing a model never imports torch.

Every model names its final layer ``head`` so fine-tuning can replace it by prefix.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from maas.text.bert import Bert  # noqa: F401  (arch "bert", built by name like the rest)
from maas.text.gpt import GPT  # noqa: F401  (arch "gpt")
from maas.zoo_layers import Layer, Shape, infer

if TYPE_CHECKING:
    from maas.zoo import CNNConfig, MLPConfig, SequentialConfig

# What modules call to initialise their weights: ``nn.init``'s functions and the tensor methods.
_INITIALISERS = frozenset(
    {
        "normal_",
        "uniform_",
        "trunc_normal_",
        "zero_",
        "zeros_",
        "ones_",
        "fill_",
        "constant_",
        "kaiming_uniform_",
        "kaiming_normal_",
        "xavier_uniform_",
        "xavier_normal_",
        "orthogonal_",
    }
)


class SkipInitialisers(TorchFunctionMode):
    """Initialisers leave meta tensors as they are (``zoo.build_skeleton``). A meta tensor has
    no values to set, yet torch still runs an initialiser's checks, and the first such check in
    a process imports sympy: 2-6 s added to the first GPT a server loaded (its embeddings'
    ``normal_``)."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        target = args[0] if args else next(iter(kwargs.values()), None)
        if getattr(func, "__name__", "") in _INITIALISERS and getattr(target, "is_meta", False):
            return target
        return func(*args, **kwargs)


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


def _layer(layer: Layer, shape: Shape) -> nn.Module:
    o = layer.options
    if layer.type == "conv2d":
        return nn.Conv2d(
            shape[0], o["out_channels"], o["kernel_size"], o["stride"], o["padding"], bias=o["bias"]
        )
    if layer.type in ("maxpool2d", "avgpool2d"):
        pool = nn.MaxPool2d if layer.type == "maxpool2d" else nn.AvgPool2d
        return pool(o["kernel_size"], o["stride"] or None, o["padding"])
    if layer.type == "linear":
        return nn.Linear(shape[0], o["out_features"], bias=o["bias"])
    if layer.type == "dropout":
        return nn.Dropout(o["p"])
    if layer.type == "batchnorm":
        return nn.BatchNorm2d(shape[0]) if len(shape) == 3 else nn.BatchNorm1d(shape[0])
    if layer.type == "layernorm":
        return nn.LayerNorm(list(shape))
    simple: dict[str, type[nn.Module]] = {
        "relu": nn.ReLU,
        "gelu": nn.GELU,
        "tanh": nn.Tanh,
        "sigmoid": nn.Sigmoid,
        "flatten": nn.Flatten,
    }
    return simple[layer.type]()


class Sequential(nn.Module):
    """The job's layers as ``body``, then ``head``: a linear layer to ``num_classes``."""

    def __init__(self, config: SequentialConfig) -> None:
        super().__init__()
        self.config = config
        shapes = infer(config.input_shape, config.layers, "model.config")
        self.body = nn.Sequential(
            *(_layer(layer, shape) for layer, shape in zip(config.layers, shapes, strict=False))
        )
        self.head = nn.Linear(shapes[-1][0], config.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Datasets store flat rows; the config says how one row is shaped (e.g. 1x8x8).
        return self.head(self.body(x.reshape(x.shape[0], *self.config.input_shape)))
