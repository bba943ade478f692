"""The forward a loaded zoo model serves with: a trace of the module, only where it is exact."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

from maas import zoo
from maas.compression import quant
from maas.errors import InvalidArgument, ResourceExhausted
from services.inference.served import rows_independent, torch_forward, traced

SEQUENTIAL = {
    "input_shape": [1, 8, 8],
    "layers": [{"type": "conv2d", "out_channels": 4, "kernel_size": 3}, "relu", "flatten"],
    "num_classes": 10,
}


def int8_mlp() -> nn.Module:
    model = zoo.build("mlp", {}, seed=3).eval()
    int8 = {
        name: quant.quantize_int8(model.state_dict()[name])
        for name in quant.quantizable_weights(model)
    }
    return quant.convert(model, int8)


def rows(count: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, width)).astype(np.float32)


@pytest.mark.parametrize(
    "model",
    [
        zoo.build("mlp", {}, seed=1).eval(),
        zoo.build("cnn", {}, seed=1).eval(),
        zoo.build("sequential", SEQUENTIAL, seed=1).eval(),
        int8_mlp(),
    ],
    ids=["mlp", "cnn", "sequential", "int8-mlp"],
)
def test_a_zoo_models_traced_forward_gives_the_modules_outputs_bit_for_bit(model):
    assert isinstance(traced(model, (64,)), torch.jit.ScriptModule)
    forward = torch_forward(model, trace_row=(64,))
    for seed, count in enumerate((1, 7, 64, 2)):
        x = rows(count, 64, seed)
        with torch.inference_mode():
            expected = model(torch.from_numpy(x)).numpy()
        np.testing.assert_array_equal(forward(x), expected)


class CountingMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 2)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1  # Python: runs while tracing, never in a trace's replay
        return self.linear(x)


def test_a_traced_forward_does_not_run_the_modules_python_per_call():
    model = CountingMLP().eval()
    forward = torch_forward(model, trace_row=(4,))
    calls_after_tracing = model.calls
    for _ in range(3):
        forward(np.ones((2, 4), np.float32))
    assert model.calls == calls_after_tracing


def test_without_a_row_shape_the_module_itself_runs():
    model = CountingMLP().eval()
    torch_forward(model)(np.ones((2, 4), np.float32))
    assert model.calls == 1


class RowCountBranch(nn.Module):
    """Control flow a trace freezes: a trace taken on one row doubles every batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.shape[0] == 1 else x * 3


def test_a_module_whose_trace_differs_from_it_is_served_as_itself():
    model = RowCountBranch()
    assert traced(model, (4,)) is model
    out = torch_forward(model, trace_row=(4,))(np.ones((3, 4), np.float32))
    np.testing.assert_array_equal(out, np.full((3, 4), 3.0, np.float32))


def test_a_module_that_cannot_be_traced_is_served_as_itself():
    class NotATensor(nn.Module):
        def forward(self, x: torch.Tensor) -> dict[str, object]:
            return {"rows": x, "note": "a trace cannot return this"}

    model = NotATensor()
    assert traced(model, (4,)) is model


@pytest.mark.parametrize("trace_row", [None, (64,)], ids=["eager", "traced"])
def test_values_an_int8_pass_cannot_scale_are_an_invalid_argument_saying_why(
    trace_row: tuple[int, ...] | None, caplog: pytest.LogCaptureFixture
) -> None:
    forward = torch_forward(int8_mlp(), trace_row=trace_row)
    huge = np.full((1, 64), 3e38, np.float32)  # finite, but its range overflows the scaling
    with caplog.at_level(logging.INFO), pytest.raises(InvalidArgument) as refused:
        forward(huge)
    message = refused.value.message
    assert message.startswith("the model cannot compute this input: In ChooseQuantizationParams")
    assert "computes in int8 and cannot scale values this large" in message
    assert "TorchScript" not in message
    # One line a request: any caller can send this as often as it likes.
    assert [r.exc_info for r in caplog.records if r.levelno >= logging.INFO] == [None]


def test_int8_models_run_each_request_alone_and_dense_ones_share_passes() -> None:
    assert not rows_independent(int8_mlp())
    assert rows_independent(zoo.build("mlp", {"in_features": 64, "hidden": [32]}, seed=0))


def test_a_pass_without_memory_for_its_rows_is_resource_exhausted() -> None:
    class Greedy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory")

    with pytest.raises(ResourceExhausted, match="send fewer rows"):
        torch_forward(Greedy())(np.zeros((1, 4), np.float32))


def test_numpy_without_memory_for_the_answer_is_resource_exhausted_not_internal() -> None:
    # numpy raises MemoryError (its _ArrayMemoryError), not torch's RuntimeError.
    class Huge(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise MemoryError("Unable to allocate 36.8 GiB for an array")

    with pytest.raises(ResourceExhausted, match="a forward pass of 3 rows; send fewer rows"):
        torch_forward(Huge())(np.zeros((3, 4), np.float32))
