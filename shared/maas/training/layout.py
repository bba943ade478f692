"""The flat parameter vector and how aggregator shards split it.

Every replica keeps its trainable parameters as views into one contiguous fp32 vector, in
``named_parameters`` order. A shard owns a ``ParamPartition``: a sorted set of disjoint
``[start, stop)`` ranges of that vector.

- ``horizontal``: shard ``s`` of ``n`` owns one balanced range, so a tensor may be cut in two.
- ``vertical``: whole layers (a module's weight and bias together) per shard, assigned largest
  first to the least loaded shard (LPT), so sizes are as even as whole layers allow.

Pure numpy: the aggregator imports this without torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from math import prod
from typing import Any

import numpy as np

from maas.errors import InvalidArgument

SPLITS: tuple[str, ...] = ("horizontal", "vertical")


@dataclass(frozen=True)
class ParamSpec:
    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        return prod(self.shape)

    @property
    def stop(self) -> int:
        return self.offset + self.numel

    @property
    def layer(self) -> str:
        # "body.0.weight" -> "body.0": weight and bias of one module travel together.
        return self.name.rpartition(".")[0] or self.name


@dataclass(frozen=True)
class FlatLayout:
    """Where each named tensor lives in the flat vector."""

    specs: tuple[ParamSpec, ...]

    @classmethod
    def from_shapes(cls, named_shapes: Iterable[tuple[str, Sequence[int]]]) -> FlatLayout:
        specs, offset = [], 0
        for name, shape in named_shapes:
            spec = ParamSpec(name, tuple(int(d) for d in shape), offset)
            specs.append(spec)
            offset = spec.stop
        return cls(tuple(specs))

    @property
    def size(self) -> int:
        return self.specs[-1].stop if self.specs else 0

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    def flatten(self, tensors: Mapping[str, np.ndarray]) -> np.ndarray:
        flat = np.empty(self.size, dtype=np.float32)
        for spec in self.specs:
            value = np.asarray(tensors[spec.name], dtype=np.float32)
            if value.shape != spec.shape:
                raise InvalidArgument(
                    f"tensor {spec.name!r} has shape {list(value.shape)}, the layout says "
                    f"{list(spec.shape)}"
                )
            flat[spec.offset : spec.stop] = value.reshape(-1)
        return flat

    def unflatten(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """Views of ``flat`` shaped like each tensor (no copies)."""
        if flat.shape != (self.size,):
            raise InvalidArgument(f"flat vector has shape {flat.shape}, expected ({self.size},)")
        return {s.name: flat[s.offset : s.stop].reshape(s.shape) for s in self.specs}

    def to_json(self) -> list[dict[str, Any]]:
        return [{"name": s.name, "shape": list(s.shape)} for s in self.specs]

    @classmethod
    def from_json(cls, rows: Sequence[Mapping[str, Any]]) -> FlatLayout:
        return cls.from_shapes((str(r["name"]), r["shape"]) for r in rows)


@dataclass(frozen=True)
class ParamPartition:
    """The part of the flat vector one aggregator shard owns."""

    shard: int
    ranges: tuple[tuple[int, int], ...]

    @property
    def size(self) -> int:
        return sum(stop - start for start, stop in self.ranges)

    def gather(self, flat: np.ndarray) -> np.ndarray:
        """This partition's values; a view when it is a single range."""
        if len(self.ranges) == 1:
            start, stop = self.ranges[0]
            return flat[start:stop]
        return np.concatenate([flat[a:b] for a, b in self.ranges])

    def scatter(self, values: np.ndarray, flat: np.ndarray) -> None:
        """Write this partition's ``values`` into their places in ``flat``."""
        if values.shape != (self.size,):
            raise InvalidArgument(
                f"shard {self.shard} values have shape {values.shape}, expected ({self.size},)"
            )
        at = 0
        for start, stop in self.ranges:
            flat[start:stop] = values[at : at + stop - start]
            at += stop - start

    def to_json(self) -> dict[str, Any]:
        return {"shard": self.shard, "ranges": [list(r) for r in self.ranges]}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> ParamPartition:
        return cls(int(obj["shard"]), tuple((int(a), int(b)) for a, b in obj["ranges"]))


def _merged(ranges: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    out: list[tuple[int, int]] = []
    for start, stop in sorted(ranges):
        if out and out[-1][1] == start:
            out[-1] = (out[-1][0], stop)
        else:
            out.append((start, stop))
    return tuple(out)


def horizontal(layout: FlatLayout, shards: int) -> list[ParamPartition]:
    if shards > layout.size:
        raise InvalidArgument(
            f"training.shards={shards} exceeds the {layout.size} trainable parameters"
        )
    bounds = [layout.size * s // shards for s in range(shards + 1)]
    return [ParamPartition(s, ((bounds[s], bounds[s + 1]),)) for s in range(shards)]


def vertical(layout: FlatLayout, shards: int) -> list[ParamPartition]:
    layers: dict[str, list[ParamSpec]] = {}
    for spec in layout.specs:
        layers.setdefault(spec.layer, []).append(spec)
    if shards > len(layers):
        raise InvalidArgument(
            f"training.split='vertical' needs at least as many layers ({len(layers)}) as "
            f"training.shards ({shards}); use split 'horizontal' or fewer shards"
        )
    sizes = {name: sum(s.numel for s in specs) for name, specs in layers.items()}
    load = [0] * shards
    owned: list[list[tuple[int, int]]] = [[] for _ in range(shards)]
    # Largest first onto the least loaded shard; ties go to the lower index (deterministic).
    for name in sorted(layers, key=lambda n: (-sizes[n], n)):
        shard = min(range(shards), key=lambda s: (load[s], s))
        load[shard] += sizes[name]
        owned[shard] += [(s.offset, s.stop) for s in layers[name]]
    return [ParamPartition(s, _merged(owned[s])) for s in range(shards)]


def partition(layout: FlatLayout, shards: int, split: str) -> list[ParamPartition]:
    if shards < 1:
        raise InvalidArgument(f"training.shards={shards} must be at least 1")
    if split == "horizontal":
        return horizontal(layout, shards)
    if split == "vertical":
        return vertical(layout, shards)
    raise InvalidArgument(f"training.split={split!r} is unknown; use one of {list(SPLITS)}")
