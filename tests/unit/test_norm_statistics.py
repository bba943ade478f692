"""Batch-norm statistics of a distributed job's model: computed from its training rows at the
end (``maas.training.replica.recalibrate_norms``), since the shards train parameters only."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from maas.training.replica import recalibrate_norms

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_a_norms_statistics_become_those_of_the_rows_it_sees() -> None:
    model = nn.Sequential(nn.BatchNorm1d(3), nn.Dropout(0.5)).train()
    rows = np.random.default_rng(0).normal(5.0, 2.0, size=(400, 3)).astype(np.float32)
    assert recalibrate_norms(model, rows, batch_rows=100)
    norm = model[0]
    assert isinstance(norm, nn.BatchNorm1d)
    torch.testing.assert_close(norm.running_mean, torch.from_numpy(rows.mean(0)), atol=1e-4, rtol=0)
    batch_vars = [rows[i : i + 100].var(0, ddof=1) for i in range(0, 400, 100)]
    expected_var = torch.from_numpy(np.mean(batch_vars, axis=0))
    torch.testing.assert_close(norm.running_var, expected_var, atol=1e-4, rtol=1e-4)
    assert norm.momentum == 0.1 and model.training  # left as it was found


def test_a_last_batch_of_one_row_is_folded_into_the_others() -> None:
    model = nn.Sequential(nn.BatchNorm1d(2))
    assert recalibrate_norms(model, np.ones((5, 2), np.float32), batch_rows=4)


def test_a_model_without_batch_norm_is_left_alone() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert not recalibrate_norms(model, np.ones((8, 2), np.float32), batch_rows=4)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
