"""Optimizers applied in place to one flat fp32 partition (numpy + BLAS, no torch).

They follow ``torch.optim.SGD`` / ``torch.optim.Adam`` exactly as written in their docs (L2
weight decay added to the gradient, momentum buffer initialised with the first gradient, Adam's
bias corrections), so a local torch run is the reference the exactness tests compare against.
Every step is a handful of BLAS passes over preallocated buffers: no temporaries the size of the
partition, and plain SGD is a single ``axpy``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np

from maas.errors import InvalidArgument
from maas.training.codecs import axpy

OPTIMIZERS: tuple[str, ...] = ("sgd", "adam")


FLOAT32_TINY = float(np.finfo(np.float32).tiny)  # the smallest normal float32


@dataclass(frozen=True)
class OptimizerSpec:
    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise InvalidArgument(
                f"training.optimizer.name={self.name!r} is unknown; use one of {list(OPTIMIZERS)}"
            )
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise InvalidArgument(f"training.optimizer.lr={self.lr!r} must be a positive number")
        if not 0 <= self.momentum < 1:
            raise InvalidArgument(
                f"training.optimizer.momentum={self.momentum!r} must be in [0, 1)"
            )
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise InvalidArgument(
                f"training.optimizer.weight_decay={self.weight_decay!r} must be >= 0"
            )
        if self.eps < FLOAT32_TINY:  # the shards add it to float32 arrays: 1e-300 became 0
            raise InvalidArgument(
                f"training.optimizer.eps={self.eps!r} is below float32's smallest normal number, "
                f"the precision it is added in; use at least {FLOAT32_TINY:.3g} (the default is "
                "1e-08)"
            )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def divergence_advice(self) -> str:
        """What to change when training with these settings diverged: the learning rate, each
        setting moved from its default (weight decay of 1e30 or Adam's beta2 of 0 blow the
        updates up as surely as a high rate), and the data."""
        default = OptimizerSpec(self.name)
        moved = [
            f"training.optimizer.{name} (it is {getattr(self, name):g})"
            for name in ("weight_decay", "momentum", "beta1", "beta2", "eps")
            if getattr(self, name) != getattr(default, name)
        ]
        check = "".join(f", check {setting}" for setting in moved)
        return (
            f"lower training.optimizer.lr (it is {self.lr:g}){check} or check the dataset's values"
        )

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> OptimizerSpec:
        return cls(**{k: obj[k] for k in asdict(cls()) if k in obj})


class StepGradient(Protocol):
    """A step's reduced gradient, as the aggregator holds it (see ``GradientSum``)."""

    def add_to(self, target: np.ndarray, alpha: float) -> None: ...

    def materialize(self, alpha: float) -> np.ndarray: ...


class Optimizer(Protocol):
    spec: OptimizerSpec

    def step(self, theta: np.ndarray, grad: StepGradient, scale: float) -> None: ...

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]: ...

    def load_state(self, scalars: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None: ...


class Sgd:
    """theta -= lr * buf, buf = momentum * buf + (g + wd * theta), g = scale * sum of grads."""

    def __init__(self, spec: OptimizerSpec, size: int) -> None:
        self.spec = spec
        self._size = size
        self._buf: np.ndarray | None = None

    def step(self, theta: np.ndarray, grad: StepGradient, scale: float) -> None:
        spec = self.spec
        if spec.momentum == 0 and spec.weight_decay == 0:
            grad.add_to(theta, -spec.lr * scale)  # the seed rule, one pass
            return
        g = grad.materialize(scale)
        if spec.weight_decay:
            axpy(g, theta, spec.weight_decay)
        if spec.momentum:
            if self._buf is None:
                self._buf = g.copy()
            else:
                self._buf *= np.float32(spec.momentum)
                axpy(self._buf, g, 1.0)
            g = self._buf
        axpy(theta, g, -spec.lr)

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return {}, ({} if self._buf is None else {"momentum": self._buf})

    def load_state(self, scalars: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
        buf = arrays.get("momentum")
        self._buf = None if buf is None else _owned(buf, self._size, "momentum")


class Adam:
    """torch.optim.Adam (amsgrad off): bias-corrected first and second moments."""

    def __init__(self, spec: OptimizerSpec, size: int) -> None:
        self.spec = spec
        self._size = size
        self._t = 0
        self._m = np.zeros(size, dtype=np.float32)
        self._v = np.zeros(size, dtype=np.float32)

    def step(self, theta: np.ndarray, grad: StepGradient, scale: float) -> None:
        spec = self.spec
        self._t += 1
        g = grad.materialize(scale)
        if spec.weight_decay:
            axpy(g, theta, spec.weight_decay)
        self._m *= np.float32(spec.beta1)
        axpy(self._m, g, 1.0 - spec.beta1)
        np.multiply(g, g, out=g)
        self._v *= np.float32(spec.beta2)
        axpy(self._v, g, 1.0 - spec.beta2)
        # `g` is spent; reuse it for the denominator instead of allocating one.
        denom = g
        np.sqrt(self._v, out=denom)
        denom *= np.float32(1.0 / math.sqrt(1.0 - spec.beta2**self._t))
        denom += np.float32(spec.eps)
        np.divide(self._m, denom, out=denom)
        axpy(theta, denom, -spec.lr / (1.0 - spec.beta1**self._t))

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return {"t": self._t}, {"m": self._m, "v": self._v}

    def load_state(self, scalars: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
        self._t = int(scalars.get("t", 0))
        if self._t:  # a version-0 checkpoint has no moments yet: keep the zeros
            self._m = _owned(arrays["m"], self._size, "m")
            self._v = _owned(arrays["v"], self._size, "v")


def _owned(array: np.ndarray, size: int, what: str) -> np.ndarray:
    if array.shape != (size,):
        raise InvalidArgument(f"optimizer state {what!r} has shape {array.shape}, not ({size},)")
    return np.array(array, dtype=np.float32, copy=True)


def make_optimizer(spec: OptimizerSpec, size: int) -> Optimizer:
    return Adam(spec, size) if spec.name == "adam" else Sgd(spec, size)
