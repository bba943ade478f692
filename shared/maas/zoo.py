"""The model zoo: every architecture the platform can build, from ``{arch, config}`` alone.

A registry version stores only ``arch`` + ``config`` + weights, so building must be
deterministic: the same arch, config and seed give bit-identical initial weights on any machine.
Every model names its final layer ``head`` so fine-tuning can replace it by prefix.

Parsing a config, its shapes and its parameter count are plain Python: a job is judged (and a
model too large for the deployment refused) without importing torch or allocating anything.
The torch modules live in ``maas.zoo_nets``, imported only to build.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

from maas import zoo_layers
from maas.errors import InvalidArgument
from maas.suggest import did_you_mean, unknown_key
from maas.text.bert_config import BertConfig, bert_output_shape, bert_parameters
from maas.text.gpt_config import GPTConfig
from maas.text.gpt_config import parameter_breakdown as gpt_parameters

if TYPE_CHECKING:
    from torch import nn


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


@dataclass(frozen=True)
class SequentialConfig:
    """Any stack of ``zoo_layers.LAYERS`` on rows reshaped to ``input_shape``, then the head."""

    input_shape: tuple[int, ...]
    layers: tuple[zoo_layers.Layer, ...]
    num_classes: int = 10


# Parameter counts come as (the config field that sizes a layer, that layer's parameters), so a
# model too large to accept can be refused naming what to shrink.
Breakdown = list[tuple[str, int]]


def _mlp_parameters(c: MLPConfig) -> Breakdown:
    widths = [c.in_features, *c.hidden, c.num_classes]
    names = [f"hidden[{i}]" for i in range(len(c.hidden))] + ["num_classes"]
    return [(n, a * b + b) for n, a, b in zip(names, widths, widths[1:], strict=False)]


def _cnn_parameters(c: CNNConfig) -> Breakdown:
    widths = [c.in_channels, *c.channels]
    convs = [
        (f"channels[{i}]", a * b * 9 + b) for i, (a, b) in enumerate(itertools.pairwise(widths))
    ]
    pooled = (c.image_size // 2) ** 2
    head = "image_size" if pooled > c.num_classes else "num_classes"
    return [*convs, (head, widths[-1] * pooled * c.num_classes + c.num_classes)]


def _sequential_body(c: SequentialConfig, where: str) -> tuple[int, ...]:
    out = zoo_layers.infer(c.input_shape, c.layers, where)[-1]
    if len(out) != 1:
        raise InvalidArgument(
            f"{where}.layers end with shape {out}; the head (a linear layer to num_classes) "
            "needs a vector: end them with flatten"
        )
    return out


def _sequential_parameters(c: SequentialConfig) -> Breakdown:
    body = zoo_layers.parameter_counts(c.input_shape, c.layers, "model.config")
    (features,) = _sequential_body(c, "model.config")
    layers = [(f"layers[{i}]", n) for i, n in enumerate(body)]
    return [*layers, ("num_classes", features * c.num_classes + c.num_classes)]


def _dataclass_config(
    config_type: type[Any], *, sizes: bool = False
) -> Callable[[dict[str, Any], str], Any]:
    """A parser for ``config_type``'s maps; with ``sizes`` every integer is a layer's size, so
    0 is refused too (a layer of width 0 trains into a constant model)."""

    def parse(config: dict[str, Any], where: str) -> Any:
        known = [f.name for f in fields(config_type)]
        for key in config:
            if key not in known:
                raise InvalidArgument(unknown_key(f"{where}.{key}", known))
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
        try:
            parsed = config_type(**values)
        except TypeError as exc:
            raise InvalidArgument(f"{where} is invalid: {exc}") from None
        for f in fields(parsed):
            value = getattr(parsed, f.name)
            items = value if isinstance(value, tuple) else (value,)
            kind, what = (int, "an integer") if "int" in str(f.type) else (int | float, "a number")
            if not all(isinstance(v, kind) and not isinstance(v, bool) for v in items):
                if "tuple" in str(f.type):
                    what = f"a list of {what.split()[-1]}s"
                raise InvalidArgument(f"{where}.{f.name}={value!r} must be {what}")
            if sizes and kind is int and any(v < 1 for v in items):
                raise InvalidArgument(f"{where}.{f.name}={value!r}: sizes must be at least 1")
            if any(v < 0 for v in items):
                raise InvalidArgument(f"{where}.{f.name}={value!r} must not be negative")
            if not all(math.isfinite(v) for v in items):
                raise InvalidArgument(f"{where}.{f.name}={value!r} must be a finite number")
            if f.name == "dropout" and not all(v < 1 for v in items):
                raise InvalidArgument(
                    f"{where}.dropout={value!r} is a probability of dropping: use 0 <= p < 1"
                )
        return parsed

    return parse


def _parse_sequential(config: dict[str, Any], where: str) -> SequentialConfig:
    known = ("input_shape", "layers", "num_classes")
    for key in config:
        if key not in known:
            raise InvalidArgument(unknown_key(f"{where}.{key}", known))
    if "input_shape" not in config or "layers" not in config:
        raise InvalidArgument(
            f"{where} needs input_shape (e.g. [1, 8, 8]) and layers (e.g. [{{type: conv2d, "
            "out_channels: 32, kernel_size: 3}, relu, flatten]) for arch 'sequential'"
        )
    raw_layers = config["layers"]
    if not isinstance(raw_layers, list):
        raise InvalidArgument(f"{where}.layers must be a list of layers")
    num_classes = config.get("num_classes", 10)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise InvalidArgument(f"{where}.num_classes={num_classes!r} must be an integer >= 1")
    parsed = SequentialConfig(
        input_shape=zoo_layers.parse_input_shape(config["input_shape"], f"{where}.input_shape"),
        layers=tuple(
            zoo_layers.parse_layer(raw, f"{where}.layers[{i}]") for i, raw in enumerate(raw_layers)
        ),
        num_classes=num_classes,
    )
    _sequential_body(parsed, where)
    return parsed


def _dataclass_to_dict(config: Any) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}


def _sequential_to_dict(config: SequentialConfig) -> dict[str, Any]:
    return {
        "input_shape": list(config.input_shape),
        "layers": [layer.to_dict() for layer in config.layers],
        "num_classes": config.num_classes,
    }


@dataclass(frozen=True)
class Arch:
    name: str
    config_type: type[Any]
    module: str  # the class in maas.zoo_nets
    parse: Callable[[dict[str, Any], str], Any]  # (config map, where) -> config
    input_shape: Callable[[Any], tuple[int, ...]]
    parameters: Callable[[Any], Breakdown]
    to_dict: Callable[[Any], dict[str, Any]] = _dataclass_to_dict
    output_shape: Callable[[Any], tuple[int, ...]] = field(default=lambda c: (c.num_classes,))


ARCHS: dict[str, Arch] = {
    "mlp": Arch(
        "mlp",
        MLPConfig,
        "MLP",
        _dataclass_config(MLPConfig, sizes=True),
        lambda c: (c.in_features,),
        _mlp_parameters,
    ),
    "cnn": Arch(
        "cnn",
        CNNConfig,
        "CNN",
        _dataclass_config(CNNConfig, sizes=True),
        lambda c: (c.in_channels * c.image_size**2,),
        _cnn_parameters,
    ),
    "sequential": Arch(
        "sequential",
        SequentialConfig,
        "Sequential",
        _parse_sequential,
        lambda c: (math.prod(c.input_shape),),
        _sequential_parameters,
        _sequential_to_dict,
    ),
}
ARCHS["bert"] = Arch(  # a BERT text encoder, with an optional classification head (maas.text)
    "bert", BertConfig, "Bert", _dataclass_config(BertConfig), lambda c: (c.max_seq_length,),
    bert_parameters, output_shape=bert_output_shape,
)  # fmt: skip
ARCHS["gpt"] = Arch(  # a decoder-only transformer over byte tokens (maas.text.gpt)
    "gpt", GPTConfig, "GPT", _dataclass_config(GPTConfig), lambda c: (c.block_size,),
    gpt_parameters, output_shape=lambda c: (c.block_size, c.vocab_size),
)  # fmt: skip


def get_arch(name: str) -> Arch:
    try:
        return ARCHS[name]
    except KeyError:
        raise InvalidArgument(f"unknown arch {name!r}; {did_you_mean(name, ARCHS)}") from None


def parse_config(arch: str, config: Mapping[str, Any] | None, where: str = "model.config") -> Any:
    """A job's/manifest's config map -> the arch's config, naming ``where`` the bad key is."""
    if config is not None and not isinstance(config, Mapping):
        raise InvalidArgument(f"{where} must be a map, not {type(config).__name__}")
    return get_arch(arch).parse(dict(config or {}), where)


def config_to_dict(config: Any) -> dict[str, Any]:
    """JSON-friendly form of a parsed config (tuples become lists); parses back the same."""
    for arch in ARCHS.values():
        if isinstance(config, arch.config_type):
            return arch.to_dict(config)
    raise InvalidArgument(f"{config!r} is not a config of the model zoo")


def parameter_breakdown(
    arch: str, config: Mapping[str, Any] | None = None, where: str = "model.config"
) -> Breakdown:
    """``(config field, parameters)`` for each layer ``arch`` would have: computed from the
    config, never allocated (a job asking for ``hidden: [10**11]`` is judged instantly)."""
    return get_arch(arch).parameters(parse_config(arch, config, where))


def parameter_count(arch: str, config: Mapping[str, Any] | None = None) -> int:
    return sum(n for _, n in parameter_breakdown(arch, config))


# Layers that normalize over the rows of a batch: in training they need two rows or more.
BATCH_STATISTICS_LAYERS = frozenset({"batchnorm"})


def check_batch_rows(
    arch: str, config: Mapping[str, Any] | None, batch_size: int, where: str, batch_field: str
) -> None:
    """InvalidArgument when ``batch_size`` rows cannot train the model: a batchnorm layer's
    statistics need two rows (torch raised mid-job, as a traceback, naming neither field)."""
    if batch_size >= 2:
        return
    parsed = parse_config(arch, config, where)
    for i, layer in enumerate(getattr(parsed, "layers", ())):
        if isinstance(layer, zoo_layers.Layer) and layer.type in BATCH_STATISTICS_LAYERS:
            raise InvalidArgument(
                f"{batch_field}={batch_size}: {where}.layers[{i}] ({layer.type}) normalizes "
                "over a batch's rows and needs at least 2 in training; raise the batch size or "
                "drop the layer"
            )


def check_size(
    arch: str, config: Mapping[str, Any] | None, limit: int, where: str = "model.config"
) -> int:
    """The parameter count, or InvalidArgument naming the field that sizes the largest layer."""
    parts = parameter_breakdown(arch, config, where)
    total = sum(n for _, n in parts)
    if total > limit:
        field_name, largest = max(parts, key=lambda part: part[1])
        if largest * 10 < total:  # no layer is the cause: their number is (a 1.5 M-entry list)
            raise InvalidArgument(
                f"{where}: the model would have {total:,} parameters in {len(parts):,} layers "
                f"(the largest {largest:,}), more than MAAS_MAX_MODEL_PARAMS={limit:,}; use "
                "fewer or smaller layers"
            )
        raise InvalidArgument(
            f"{where}.{field_name}: the model would have {total:,} parameters ({largest:,} in "
            f"this layer), more than MAAS_MAX_MODEL_PARAMS={limit:,}; make it smaller"
        )
    return total


def _build(spec: Arch, parsed: Any) -> nn.Module:
    from maas import zoo_nets

    module: nn.Module = getattr(zoo_nets, spec.module)(parsed)
    return module


def build(arch: str, config: Mapping[str, Any] | None = None, seed: int = 0) -> nn.Module:
    """Build ``arch`` with deterministic initial weights for ``seed``."""
    import torch

    spec = get_arch(arch)
    parsed = parse_config(arch, config)
    # Seeding a private RNG scope keeps building a model from disturbing the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _build(spec, parsed)


def build_skeleton(arch: str, config: Mapping[str, Any] | None = None) -> nn.Module:
    """``arch`` with parameters on the meta device: no memory, no init; load weights with
    ``load_state_dict(state, assign=True)``. Loading a stored model this way skips a random
    initialisation that would be overwritten anyway."""
    import torch

    from maas import zoo_nets

    spec = get_arch(arch)
    parsed = parse_config(arch, config)
    with torch.device("meta"), zoo_nets.SkipInitialisers():
        return _build(spec, parsed)


def input_shape(arch: str, config: Mapping[str, Any] | None = None) -> tuple[int, ...]:
    """Shape of one input row, without the batch dimension (what inference advertises)."""
    return tuple(get_arch(arch).input_shape(parse_config(arch, config)))


def output_shape(arch: str, config: Mapping[str, Any] | None = None) -> tuple[int, ...]:
    return tuple(get_arch(arch).output_shape(parse_config(arch, config)))


def outputs_embeddings(arch: str, config: Mapping[str, Any] | None = None) -> bool:
    """Whether the model's outputs are embeddings (a text encoder without a classification
    head), not scores of a dataset's classes or targets: accuracy and loss mean nothing there."""
    if arch != "bert":
        return False
    return not getattr(parse_config(arch, config), "num_classes", 0)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
