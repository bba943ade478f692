"""Pruning: global magnitude masks stored sparsely, and structured pruning to a smaller model."""

import pytest
import torch

from maas import artifacts, zoo
from maas.compression import prune
from maas.compression.formats import MASK, VALUES
from maas.compression.measure import artifact_metrics
from maas.compression.pipeline import parent_variant, parse_method, run
from maas.compression.train import FitConfig
from maas.errors import InvalidArgument

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def parent(trained_mlp, digits):
    files, manifest = artifacts.pack(trained_mlp, "mlp", {})
    return trained_mlp, artifact_metrics(manifest, files, digits, latency_repeats=0)


def pruned(model, arch, digits, **settings):
    variant = run(
        parse_method({"prune": settings}), parent_variant(model, arch, {}), digits, FitConfig(0)
    )
    fmt, tensors = variant.encode()
    files, manifest = artifacts.pack(tensors, variant.arch, variant.config, format=fmt)
    return variant, manifest, files


def test_magnitude_masks_prune_exactly_the_requested_fraction_globally():
    model = zoo.build("mlp", {})
    masks = prune.magnitude_masks(model, 0.8)
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    assert kept == total - round(0.8 * total)
    threshold = min(model.state_dict()[n][m].abs().min() for n, m in masks.items())
    assert all((model.state_dict()[n][~m].abs() <= threshold).all() for n, m in masks.items())


def test_masks_cover_linear_and_conv_weights_but_not_biases():
    assert sorted(prune.magnitude_masks(zoo.build("cnn", {}), 0.5)) == [
        "features.0.weight",
        "features.2.weight",
        "head.weight",
    ]


def test_sparsity_of_one_or_more_is_refused():
    with pytest.raises(InvalidArgument, match="sparsity"):
        parse_method({"prune": {"sparsity": 1.0}})


def test_80_percent_with_recovery_is_3x_smaller_and_loses_at_most_one_point(parent, digits):
    model, parent_metrics = parent
    variant, manifest, files = pruned(model, "mlp", digits, sparsity=0.8, recovery_steps=200)
    metrics = artifact_metrics(manifest, files, digits, latency_repeats=0)
    assert manifest.format == "sparse"
    assert parent_metrics["artifact_bytes"] / metrics["artifact_bytes"] >= 3
    assert parent_metrics["accuracy"] - metrics["accuracy"] <= 0.01
    biases = 128 + 64 + 10
    kept_weights = sum(int(mask.sum()) for mask in variant.masks.values())
    assert metrics["nonzero_parameters"] <= kept_weights + biases


def test_recovery_fine_tuning_keeps_pruned_weights_at_zero(parent, digits):
    variant, _, _ = pruned(parent[0], "mlp", digits, sparsity=0.8, recovery_steps=50)
    state = variant.model.state_dict()
    assert all((state[name][~mask] == 0).all() for name, mask in variant.masks.items())


def test_sparse_artifact_stores_a_bitmask_and_only_the_kept_values(parent, digits):
    variant, manifest, _ = pruned(parent[0], "mlp", digits, sparsity=0.8)
    kept = int(variant.masks["body.0.weight"].sum())
    assert manifest.tensors["body.0.weight" + VALUES]["shape"] == [kept]
    assert manifest.tensors["body.0.weight" + MASK] == {"dtype": "uint8", "shape": [128 * 64 // 8]}
    assert "body.0.weight" not in manifest.tensors


def test_structured_50_percent_gives_a_smaller_dense_model_that_loads(parent, digits):
    model, parent_metrics = parent
    _, manifest, files = pruned(
        model, "mlp", digits, sparsity=0.5, structured=True, recovery_steps=200
    )
    assert manifest.format == "dense"
    assert manifest.config["hidden"] == [64, 32]
    loaded = artifacts.materialize(manifest, files)
    assert zoo.count_parameters(loaded) < zoo.count_parameters(model) / 2
    assert loaded(digits.x_test).shape == (len(digits.x_test), 10)
    metrics = artifact_metrics(manifest, files, digits, latency_repeats=0)
    assert parent_metrics["accuracy"] - metrics["accuracy"] <= 0.02


def test_structured_pruning_without_recovery_keeps_the_strongest_units_exactly():
    model = zoo.build("mlp", {"hidden": [4]})
    with torch.no_grad():
        model.body[0].weight.copy_(torch.arange(4.0)[:, None].expand(4, 64))
    small, config = prune.structured(model, "mlp", {"hidden": [4]}, 0.5)
    assert config["hidden"] == [2]
    assert torch.equal(small.body[0].weight, model.body[0].weight[2:])
    assert torch.equal(small.head.weight, model.head.weight[:, 2:])


def test_structured_cnn_drops_whole_channels_and_the_heads_matching_inputs(digits):
    model = zoo.build("cnn", {})
    small, config = prune.structured(model, "cnn", {}, 0.5)
    assert config["channels"] == [16, 32]
    assert small.head.in_features == 32 * 4 * 4
    x = digits.x_test[:4]
    # With every channel kept, the cut-and-copy is the identity: the outputs must not change.
    same, _ = prune.structured(model, "cnn", {}, 0.0)
    assert torch.allclose(same(x), model(x), atol=1e-6)
    assert small(x).shape == (4, 10)


def test_structured_pruning_cannot_follow_unstructured_pruning():
    with pytest.raises(InvalidArgument, match="structured"):
        parse_method(
            {
                "chain": [
                    {"prune": {"sparsity": 0.5}},
                    {"prune": {"sparsity": 0.5, "structured": True}},
                ]
            }
        )
