"""The ``sequential`` arch's layers as a job writes them: parsed, checked and shape-inferred in
plain Python (no torch), so a job is judged and its size counted before anything is allocated.

A layer is a map ``{type: conv2d, out_channels: 32, kernel_size: 3}`` or, when it takes no
settings, just its type (``relu``). Shapes exclude the batch dimension: ``(C, H, W)`` for
images, ``(F,)`` for vectors. Every error names ``<where>.layers[i]`` and the field.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from maas.errors import InvalidArgument
from maas.suggest import did_you_mean, unknown_key

Shape = tuple[int, ...]
REQUIRED = object()  # an option with no default


@dataclass(frozen=True)
class Option:
    kind: type  # int, float or bool
    default: Any = REQUIRED
    minimum: float | None = None
    below: float | None = None  # exclusive upper bound


@dataclass(frozen=True)
class Layer:
    """One parsed layer: its type and every option, defaults filled in."""

    type: str
    options: Mapping[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, **self.options}


class _ShapeError(Exception):
    """A layer cannot take the shape it is given; the message says why."""


def _image(shape: Shape) -> Shape:
    if len(shape) != 3:
        raise _ShapeError(f"needs an image input (C, H, W) but gets shape {shape}")
    return shape


def _window(size: int, kernel: int, stride: int, padding: int, what: str) -> int:
    out = (size + 2 * padding - kernel) // stride + 1
    if out < 1:
        raise _ShapeError(
            f"kernel_size={kernel} does not fit the {what} of {size} (padding {padding})"
        )
    return out


def _conv2d(shape: Shape, o: Mapping[str, Any]) -> Shape:
    _, h, w = _image(shape)
    k, s, p = o["kernel_size"], o["stride"], o["padding"]
    return (o["out_channels"], _window(h, k, s, p, "height"), _window(w, k, s, p, "width"))


def _pool2d(shape: Shape, o: Mapping[str, Any]) -> Shape:
    c, h, w = _image(shape)
    k, p = o["kernel_size"], o["padding"]
    s = o["stride"] or k
    if 2 * p > k:
        raise _ShapeError(f"padding={p} may be at most half of kernel_size={k}")
    return (c, _window(h, k, s, p, "height"), _window(w, k, s, p, "width"))


def _linear(shape: Shape, o: Mapping[str, Any]) -> Shape:
    if len(shape) != 1:
        raise _ShapeError(f"needs a vector input but gets shape {shape}; put a flatten before it")
    return (o["out_features"],)


def _batchnorm(shape: Shape, o: Mapping[str, Any]) -> Shape:
    if len(shape) not in (1, 3):
        raise _ShapeError(f"needs a vector (F,) or an image (C, H, W); gets shape {shape}")
    return shape


def _same(shape: Shape, o: Mapping[str, Any]) -> Shape:
    return shape


def _flatten(shape: Shape, o: Mapping[str, Any]) -> Shape:
    return (math.prod(shape),)


@dataclass(frozen=True)
class LayerType:
    options: Mapping[str, Option]
    output: Callable[[Shape, Mapping[str, Any]], Shape]
    parameters: Callable[[Shape, Mapping[str, Any]], int] = lambda shape, o: 0


def _conv_parameters(shape: Shape, o: Mapping[str, Any]) -> int:
    weights = o["out_channels"] * shape[0] * o["kernel_size"] ** 2
    return weights + (o["out_channels"] if o["bias"] else 0)


def _linear_parameters(shape: Shape, o: Mapping[str, Any]) -> int:
    return shape[0] * o["out_features"] + (o["out_features"] if o["bias"] else 0)


_POOL = {
    "kernel_size": Option(int, minimum=1),
    "stride": Option(int, 0, minimum=0),  # 0: the kernel size, as torch does
    "padding": Option(int, 0, minimum=0),
}

LAYERS: dict[str, LayerType] = {
    "conv2d": LayerType(
        {
            "out_channels": Option(int, minimum=1),
            "kernel_size": Option(int, minimum=1),
            "stride": Option(int, 1, minimum=1),
            "padding": Option(int, 0, minimum=0),
            "bias": Option(bool, True),
        },
        _conv2d,
        _conv_parameters,
    ),
    "maxpool2d": LayerType(_POOL, _pool2d),
    "avgpool2d": LayerType(_POOL, _pool2d),
    "relu": LayerType({}, _same),
    "gelu": LayerType({}, _same),
    "tanh": LayerType({}, _same),
    "sigmoid": LayerType({}, _same),
    "dropout": LayerType({"p": Option(float, 0.5, minimum=0, below=1)}, _same),
    "batchnorm": LayerType({}, _batchnorm, lambda shape, o: 2 * shape[0]),
    "layernorm": LayerType({}, _same, lambda shape, o: 2 * math.prod(shape)),
    "flatten": LayerType({}, _flatten),
    "linear": LayerType(
        {"out_features": Option(int, minimum=1), "bias": Option(bool, True)},
        _linear,
        _linear_parameters,
    ),
}


def _check_value(where: str, option: Option, value: Any) -> Any:
    if option.kind is bool:
        if not isinstance(value, bool):
            raise InvalidArgument(f"{where}={value!r} must be true or false")
        return value
    numeric = (int,) if option.kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, numeric):
        raise InvalidArgument(
            f"{where}={value!r} must be {'an integer' if option.kind is int else 'a number'}"
        )
    if option.minimum is not None and value < option.minimum:
        raise InvalidArgument(f"{where}={value!r} must be >= {option.minimum}")
    if option.below is not None and value >= option.below:
        raise InvalidArgument(f"{where}={value!r} must be < {option.below}")
    return option.kind(value)


def parse_layer(raw: Any, where: str) -> Layer:
    """One layer as written (``"relu"`` or ``{type: ..., ...}``) -> a Layer with defaults."""
    if isinstance(raw, str):
        raw = {"type": raw}
    if not isinstance(raw, Mapping) or not isinstance(raw.get("type"), str):
        raise InvalidArgument(
            f"{where} must be a layer type or a map with 'type'; got {raw!r} "
            f"(types: {', '.join(LAYERS)})"
        )
    kind = raw["type"]
    if kind not in LAYERS:
        raise InvalidArgument(f"{where}.type={kind!r} is not a layer; {did_you_mean(kind, LAYERS)}")
    spec = LAYERS[kind]
    for key in raw:
        if key != "type" and key not in spec.options:
            raise InvalidArgument(unknown_key(f"{where}.{key}", spec.options))
    options: dict[str, Any] = {}
    for name, option in spec.options.items():
        if name in raw:
            options[name] = _check_value(f"{where}.{name}", option, raw[name])
        elif option.default is REQUIRED:
            raise InvalidArgument(f"{where} ({kind}) needs {name}")
        else:
            options[name] = option.default
    return Layer(kind, options)


def parse_input_shape(raw: Any, where: str) -> Shape:
    if (
        not isinstance(raw, Sequence)
        or isinstance(raw, str)
        or len(raw) not in (1, 3)
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in raw)
    ):
        raise InvalidArgument(
            f"{where}={raw!r} must be [features] or [channels, height, width] of integers >= 1; "
            "the rows of the dataset are reshaped to it"
        )
    return tuple(raw)


# The most values one layer may output for one row. Parameters are counted and capped
# (MAAS_MAX_MODEL_PARAMS), but a conv of 16 parameters padded by 1000 outputs 32 M values a row:
# 129 MB a row, 4 GB for a step of 32 rows. 8 M values (32 MiB a row) holds a 224x224 image at
# 160 channels.
MAX_ROW_ACTIVATION = 8 * 2**20


def infer(input_shape: Shape, layers: Sequence[Layer], where: str) -> list[Shape]:
    """The input shape of every layer, then the output shape of the last one."""
    shapes = [input_shape]
    for index, layer in enumerate(layers):
        try:
            shapes.append(LAYERS[layer.type].output(shapes[-1], layer.options))
        except _ShapeError as exc:
            raise InvalidArgument(f"{where}.layers[{index}] ({layer.type}) {exc}") from None
        if math.prod(shapes[-1]) > MAX_ROW_ACTIVATION:
            raise InvalidArgument(
                f"{where}.layers[{index}] ({layer.type}) outputs shape {shapes[-1]}, "
                f"{math.prod(shapes[-1])} values a row; at most {MAX_ROW_ACTIVATION} are "
                "accepted (each row of a step holds them): lower its padding, channels or input"
            )
    return shapes


def parameter_counts(input_shape: Shape, layers: Sequence[Layer], where: str) -> list[int]:
    """Each layer's parameter count, from the shapes alone."""
    shapes = infer(input_shape, layers, where)
    return [
        LAYERS[layer.type].parameters(shape, layer.options)
        for layer, shape in zip(layers, shapes, strict=False)
    ]
