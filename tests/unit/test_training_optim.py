"""Flat-partition optimizers follow torch.optim step for step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from maas.errors import InvalidArgument
from maas.training.aggregate import GradientSum
from maas.training.codecs import DenseGradient
from maas.training.optim import OptimizerSpec, make_optimizer

SIZE = 1000


def _torch_twin(
    spec: OptimizerSpec, theta: np.ndarray
) -> tuple[torch.Tensor, torch.optim.Optimizer]:
    param = torch.nn.Parameter(torch.from_numpy(theta.copy()))
    if spec.name == "adam":
        return param, torch.optim.Adam([param], lr=spec.lr, weight_decay=spec.weight_decay)
    return param, torch.optim.SGD(
        [param], lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay
    )


@pytest.mark.parametrize(
    "spec",
    [
        OptimizerSpec("sgd", lr=0.1),
        OptimizerSpec("sgd", lr=0.1, weight_decay=0.01),
        OptimizerSpec("sgd", lr=0.05, momentum=0.9),
        OptimizerSpec("sgd", lr=0.05, momentum=0.9, weight_decay=1e-3),
        OptimizerSpec("adam", lr=0.01),
        OptimizerSpec("adam", lr=0.01, weight_decay=1e-2),
    ],
    ids=lambda s: f"{s.name}-m{s.momentum}-wd{s.weight_decay}",
)
def test_optimizer_matches_torch_over_several_steps(spec: OptimizerSpec) -> None:
    rng = np.random.default_rng(1)
    theta = rng.normal(size=SIZE).astype(np.float32)
    param, reference = _torch_twin(spec, theta)
    ours = make_optimizer(spec, SIZE)
    total = GradientSum(SIZE)
    for _ in range(5):
        grads = [rng.normal(size=SIZE).astype(np.float32) for _ in range(2)]
        for g in grads:
            total.add(DenseGradient(g))
        ours.step(theta, total, 0.5)  # mean of two
        total.reset()
        param.grad = torch.from_numpy((grads[0] + grads[1]) * 0.5)
        reference.step()
    np.testing.assert_allclose(theta, param.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_adam_state_round_trips_through_a_checkpoint() -> None:
    spec = OptimizerSpec("adam", lr=0.01)
    rng = np.random.default_rng(2)
    theta_a = rng.normal(size=SIZE).astype(np.float32)
    theta_b = theta_a.copy()
    first, total = make_optimizer(spec, SIZE), GradientSum(SIZE)
    grads = [rng.normal(size=SIZE).astype(np.float32) for _ in range(4)]
    for g in grads[:2]:
        total.add(DenseGradient(g))
        first.step(theta_a, total, 1.0)
        total.reset()
    theta_b[:] = theta_a
    scalars, arrays = first.state()
    second = make_optimizer(spec, SIZE)
    second.load_state(scalars, arrays)
    for g in grads[2:]:
        for opt, theta in ((first, theta_a), (second, theta_b)):
            total.add(DenseGradient(g))
            opt.step(theta, total, 1.0)
            total.reset()
    np.testing.assert_array_equal(theta_a, theta_b)


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_an_optimizer_starts_from_an_empty_state(name: str) -> None:
    spec = OptimizerSpec(name, lr=0.1, momentum=0.9 if name == "sgd" else 0.0)
    fresh, loaded = make_optimizer(spec, SIZE), make_optimizer(spec, SIZE)
    loaded.load_state({}, {})
    thetas = [np.zeros(SIZE, dtype=np.float32) for _ in range(2)]
    total = GradientSum(SIZE)
    for opt, theta in zip((fresh, loaded), thetas, strict=True):
        total.add(DenseGradient(np.ones(SIZE, dtype=np.float32)))
        opt.step(theta, total, 1.0)
        total.reset()
    np.testing.assert_array_equal(thetas[0], thetas[1])


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"lr": -0.1}, "lr"),
        ({"lr": 0.0}, "lr"),
        ({"momentum": 1.5}, "momentum"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"name": "lbfgs"}, "name"),
    ],
)
def test_bad_optimizer_settings_name_the_field(changes: dict, field: str) -> None:
    with pytest.raises(InvalidArgument, match=rf"training\.optimizer\.{field}"):
        OptimizerSpec(**changes)


def test_an_eps_float32_cannot_hold_is_refused_saying_the_least_it_takes() -> None:
    # 1e-300 passed the schema (> 0), was 0 in the shards' float32 and failed the job mid-way.
    with pytest.raises(InvalidArgument, match=r"eps=1e-300 is below float32's smallest normal"):
        OptimizerSpec("adam", lr=0.01, eps=1e-300)
    OptimizerSpec("adam", lr=0.01, eps=1e-30)
