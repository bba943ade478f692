"""Bounds on what one inference process computes at once: the input bytes of the requests in
flight (``InflightBytes``), and a large request's forward pass taken in passes of rows."""

import numpy as np
import pytest
import torch
from dataplane_kit import X, answer, assert_from, make_plane, model
from torch import nn

from maas.errors import InvalidArgument, ResourceExhausted, Unavailable
from services.inference.admission import InflightBytes
from services.inference.served import torch_forward


def test_requests_are_admitted_while_their_bytes_stay_under_the_budget() -> None:
    budget = InflightBytes(100)
    budget.take(60)
    budget.take(40)
    with pytest.raises(Unavailable, match="MAAS_INFERENCE_MAX_INFLIGHT_BYTES=100; retry"):
        budget.take(1)
    budget.give(60)
    budget.take(50)
    assert budget.held_bytes == 90


def test_one_request_is_admitted_alone_whatever_its_size() -> None:
    budget = InflightBytes(100)
    budget.take(10_000)
    assert budget.held_bytes == 10_000


def test_a_budget_below_one_byte_is_refused_naming_the_setting() -> None:
    with pytest.raises(InvalidArgument, match="MAAS_INFERENCE_MAX_INFLIGHT_BYTES=0"):
        InflightBytes(0)


async def test_a_request_over_the_budget_while_another_computes_is_unavailable(
    source, pool
) -> None:
    budget = InflightBytes(X.nbytes)
    plane = make_plane(source, pool, inflight=budget)
    budget.take(1)  # another request's byte, in flight
    with pytest.raises(Unavailable, match="retry shortly"):
        await answer(plane)
    budget.give(1)
    _, out = await answer(plane)
    assert_from(out, model(1))
    assert budget.held_bytes == 0  # each request gives its bytes back


async def test_a_request_whose_forward_fails_gives_its_bytes_back(
    source, pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    budget = InflightBytes(X.nbytes)
    plane = make_plane(source, pool, inflight=budget)
    served = await plane.model("digits")

    async def out_of_memory(rows: np.ndarray) -> np.ndarray:
        raise ResourceExhausted("no memory for this forward pass")

    monkeypatch.setattr(served.runner, "submit", out_of_memory)
    with pytest.raises(ResourceExhausted):
        await answer(plane)
    assert budget.held_bytes == 0


class Recording(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.passes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.passes.append(len(x))
        return self.linear(x)


def test_a_large_request_is_computed_in_passes_that_give_the_same_rows() -> None:
    module = Recording()
    rows = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)
    whole = torch_forward(module)(rows)
    in_passes = torch_forward(module, pass_rows=4)(rows)
    assert module.passes == [10, 4, 4, 2]
    np.testing.assert_allclose(in_passes, whole, rtol=1e-6, atol=1e-6)
