"""Held-out rows are scored a batch at a time (``maas.training.replica.predict``): the outputs are
the one-pass outputs, and no pass holds more than a batch of rows' activations."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from maas import zoo
from maas.training.replica import PREDICT_ROWS, evaluate, predict


class RowsSeen(nn.Module):
    """A model that remembers how many rows each of its passes was given."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.passes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.passes.append(len(x))
        return self.inner(x)  # type: ignore[no-any-return]


def test_rows_are_scored_a_batch_at_a_time_with_the_one_pass_outputs() -> None:
    model = RowsSeen(zoo.build("mlp", seed=3).eval())
    rows = torch.randn(2 * PREDICT_ROWS + 7, 64)
    with torch.no_grad():
        whole = model.inner(rows)
    outputs = predict(model, rows)
    assert model.passes == [PREDICT_ROWS, PREDICT_ROWS, 7]
    torch.testing.assert_close(outputs, whole, rtol=1e-5, atol=1e-6)


def test_evaluation_of_a_large_split_never_passes_more_than_a_batch() -> None:
    model = RowsSeen(zoo.build("mlp", seed=3))
    x = np.random.default_rng(0).standard_normal((1000, 64), dtype=np.float32)
    y = np.zeros(1000, dtype=np.int64)
    metrics = evaluate(model, x, y, "cross_entropy")
    assert max(model.passes) == PREDICT_ROWS and sum(model.passes) == 1000
    assert set(metrics) == {"loss", "accuracy"}
