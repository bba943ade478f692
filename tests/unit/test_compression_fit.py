"""The local training loop's learning-rate schedules."""

import pytest
import torch
from torch import nn

from maas.compression.train import FitConfig, Tensors, fit
from maas.errors import InvalidArgument


class Drift(nn.Module):
    """One weight whose loss gradient is always 1: Adam then moves it by the step's rate."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def moved(config: FitConfig) -> float:
    model = Drift()
    data = Tensors(
        torch.zeros(4, 1), torch.zeros(4), torch.zeros(1, 1), torch.zeros(1), "regression"
    )
    fit(model, data, config, loss=lambda outputs, rows: model.w * 1.0)
    return -model.w.item()


def test_warmup_linear_rises_over_the_first_tenth_then_falls_to_zero():
    config = FitConfig(100, lr=1.0, schedule="warmup_linear")
    factors = [config.lr_factor(step) for step in range(100)]
    assert factors[0] == pytest.approx(0.1)
    assert factors[9] == factors[10] == 1.0
    assert factors[99] == pytest.approx(1 / 90)
    assert factors[:10] == sorted(factors[:10])
    assert factors[10:] == sorted(factors[10:], reverse=True)


def test_fit_trains_each_step_at_its_scheduled_rate():
    config = FitConfig(20, batch_size=2, lr=0.01, schedule="warmup_linear")
    expected = 0.01 * sum(config.lr_factor(step) for step in range(20))
    assert moved(config) == pytest.approx(expected, rel=1e-4)
    assert moved(FitConfig(20, batch_size=2, lr=0.01)) == pytest.approx(0.2, rel=1e-4)


def test_an_unknown_schedule_is_refused_naming_the_ones_accepted():
    with pytest.raises(InvalidArgument, match="schedule='cosine'.*constant.*warmup_linear"):
        FitConfig(10, schedule="cosine")
