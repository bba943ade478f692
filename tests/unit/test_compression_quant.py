"""int8 / fp16 quantization: per-channel symmetric weights, the int8 runtime layer, the variant."""

import pytest
import torch
from torch import nn

from maas import artifacts, zoo
from maas.compression import quant
from maas.compression.measure import artifact_metrics
from maas.compression.pipeline import parent_variant, parse_method, run
from maas.compression.train import FitConfig
from maas.errors import InvalidArgument

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def parent(trained_mlp, digits):
    files, manifest = artifacts.pack(trained_mlp, "mlp", {})
    return trained_mlp, artifact_metrics(manifest, files, digits, latency_repeats=0)


def quantized_variant(parent_model, digits, dtype):
    variant = run(
        parse_method({"quantize": {"dtype": dtype}}),
        parent_variant(parent_model, "mlp", {}),
        digits,
        FitConfig(0),
    )
    fmt, tensors = variant.encode()
    files, manifest = artifacts.pack(tensors, "mlp", {}, format=fmt)
    return manifest, files


def test_int8_weights_use_one_symmetric_scale_per_output_channel():
    weight = torch.tensor([[0.5, -1.0, 0.25], [2.0, 0.0, -0.5]])
    q = quant.quantize_int8(weight)
    assert q.values.dtype == torch.int8
    assert torch.allclose(q.scale, torch.tensor([1.0 / 127, 2.0 / 127]))
    assert q.values[0, 1] == -127 and q.values[1, 0] == 127
    assert (q.dequantize() - weight).abs().max() <= q.scale.max() / 2


def test_an_all_zero_channel_quantizes_to_zeros_without_dividing_by_zero():
    q = quant.quantize_int8(torch.zeros(2, 4))
    assert torch.equal(q.values, torch.zeros(2, 4, dtype=torch.int8))
    assert torch.isfinite(q.scale).all()


def test_int8_linear_computes_what_the_dequantized_float_layer_computes():
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    q = quant.quantize_int8(linear.weight)
    reference = nn.Linear(64, 32)
    reference.load_state_dict({"weight": q.dequantize(), "bias": linear.bias})
    x = torch.randn(16, 64)
    out = quant.Int8Linear(q, linear.bias)(x)
    # Only the per-batch activation rounding differs from the float layer.
    assert torch.allclose(out, reference(x), atol=0.05)


def test_int8_layers_side_by_side_compute_exactly_what_each_computes_alone():
    torch.manual_seed(0)
    shapes_and_bias = [(8, torch.randn(8)), (16, None), (4, torch.randn(4))]
    layers = [
        quant.Int8Linear(quant.quantize_int8(torch.randn(n, 64), quant.LINEAR_MAX), bias)
        for n, bias in shapes_and_bias
    ]
    x = torch.randn(5, 7, 64)
    joined = quant.Int8Linear.side_by_side(layers)(x)
    assert torch.equal(joined, torch.cat([layer(x) for layer in layers], dim=-1))


def test_linear_weights_keep_within_the_range_full_range_activations_allow():
    model = zoo.build("cnn", {})
    stored = quant.prepare(model, "int8")
    assert stored["head.weight"].values.abs().max() == quant.LINEAR_MAX
    assert stored["features.0.weight"].values.abs().max() == quant.INT8_MAX  # a conv


@pytest.mark.parametrize("limit", [quant.LINEAR_MAX, quant.INT8_MAX])
def test_int8_linear_is_exact_where_int16_pair_sums_would_saturate(limit):
    # Every activation quantizes to the top of its range and every weight to its limit: the
    # largest products the kernel adds in pairs. 127-weights (older artifacts) get 7-bit
    # activations, LINEAR_MAX-weights full 8-bit ones; either way nothing saturates.
    weight = torch.ones(3, 64)
    weight[1] = -1
    weight[2, ::2] = -1
    x = torch.full((2, 64), 2.55)
    x[1, 1::2] = 0.0  # 0 and the top quantize exactly in 7 and 8 bits alike
    out = quant.Int8Linear(quant.quantize_int8(weight, limit), torch.zeros(3))(x)
    torch.testing.assert_close(out, x @ weight.T, rtol=1e-4, atol=1e-3)


def test_convert_swaps_only_linear_layers_for_int8_ones():
    model = zoo.build("cnn", {})
    int8 = {
        name: quant.quantize_int8(model.state_dict()[name])
        for name in quant.quantizable_weights(model)
    }
    quant.convert(model, int8)
    assert isinstance(model.head, quant.Int8Linear)
    assert all(
        isinstance(m, nn.Conv2d)
        for m in model.features
        if not isinstance(m, nn.ReLU | nn.MaxPool2d)
    )


def test_an_unknown_dtype_names_the_supported_ones():
    with pytest.raises(InvalidArgument, match="int8"):
        parse_method({"quantize": {"dtype": "int4"}})


def test_int8_variant_is_3_5x_smaller_and_loses_at_most_one_point(parent, digits):
    model, parent_metrics = parent
    manifest, files = quantized_variant(model, digits, "int8")
    metrics = artifact_metrics(manifest, files, digits, latency_repeats=0)
    assert manifest.format == "int8"
    assert parent_metrics["artifact_bytes"] / metrics["artifact_bytes"] >= 3.5
    assert parent_metrics["accuracy"] - metrics["accuracy"] <= 0.01


def test_int8_variant_runs_int8_linear_layers_when_loaded(parent, digits):
    manifest, files = quantized_variant(parent[0], digits, "int8")
    loaded = artifacts.materialize(manifest, files)
    assert sum(isinstance(m, quant.Int8Linear) for m in loaded.modules()) == 3
    assert not any(isinstance(m, nn.Linear) for m in loaded.modules())


def test_fp16_variant_halves_the_artifact_and_keeps_accuracy(parent, digits):
    model, parent_metrics = parent
    manifest, files = quantized_variant(model, digits, "fp16")
    metrics = artifact_metrics(manifest, files, digits, latency_repeats=0)
    assert manifest.format == "fp16"
    assert all(t["dtype"] == "float16" for t in manifest.tensors.values())
    assert parent_metrics["artifact_bytes"] / metrics["artifact_bytes"] >= 1.9
    assert abs(parent_metrics["accuracy"] - metrics["accuracy"]) <= 0.003
