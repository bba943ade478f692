"""Stored formats: every variant round-trips pack -> materialize and is read strictly."""

import pytest
import torch
from safetensors.torch import load as st_load

from maas import artifacts, zoo
from maas.compression.formats import decode, pack_mask, unpack_mask
from maas.compression.measure import artifact_metrics
from maas.compression.pipeline import parent_variant, parse_method, run
from maas.compression.train import FitConfig, evaluate, fit
from maas.errors import IntegrityError, InvalidArgument
from maas.manifest import WEIGHTS_FILE

pytestmark = pytest.mark.usefixtures("one_torch_thread")


METHODS = {
    "int8": {"quantize": {"dtype": "int8"}},
    "fp16": {"quantize": {"dtype": "fp16"}},
    "sparse": {"prune": {"sparsity": 0.8, "recovery_steps": 20}},
    "structured": {"prune": {"sparsity": 0.5, "structured": True}},
    "distill": {"distill": {"steps": 50}},
    "sparse-int8": {"chain": [{"prune": {"sparsity": 0.8}}, {"quantize": {"dtype": "int8"}}]},
    "sparse-fp16": {"chain": [{"prune": {"sparsity": 0.5}}, {"quantize": {"dtype": "fp16"}}]},
    "structured-int8": {
        "chain": [{"prune": {"sparsity": 0.5, "structured": True}}, {"quantize": {}}]
    },
}


@pytest.fixture(scope="module", params=["mlp", "cnn"])
def parent(request, digits):
    arch = request.param
    return arch, fit(zoo.build(arch, {}, seed=0), digits, FitConfig(steps=100, seed=0))


def packed(arch, model, digits, item):
    variant = run(parse_method(item), parent_variant(model, arch, {}), digits, FitConfig(0))
    fmt, tensors = variant.encode()
    files, manifest = artifacts.pack(tensors, variant.arch, variant.config, format=fmt)
    return variant, manifest, files


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_variant_loads_with_the_outputs_its_metrics_claim(parent, digits, method):
    arch, model = parent
    variant, manifest, files = packed(arch, model, digits, METHODS[method])
    metrics = artifact_metrics(manifest, files, digits, latency_repeats=2)
    # What `load` would do: bytes as stored, verified, materialized by the shared loader.
    stored = {name: bytes(data) for name, data in files.items()}
    loaded = artifacts.materialize(manifest, stored)
    assert evaluate(loaded, digits) == {k: metrics[k] for k in ("loss", "accuracy")}
    assert metrics["latency_b1_ms"] > 0 and metrics["latency_b32_ms"] > 0
    # The loaded variant computes what the in-memory variant does, up to its storage rounding.
    atol = 0.0 if variant.codec is None else 0.2
    assert torch.allclose(loaded(digits.x_test), variant.model(digits.x_test), atol=atol, rtol=0.05)


def test_a_chain_is_smaller_than_each_of_its_methods(parent, digits):
    arch, model = parent
    sizes = {
        method: artifact_metrics(
            *packed(arch, model, digits, METHODS[method])[1:], digits, latency_repeats=0
        )["artifact_bytes"]
        for method in ("int8", "sparse-int8")
    }
    assert sizes["sparse-int8"] < sizes["int8"]


def test_a_tampered_weights_file_is_refused(parent, digits):
    _, manifest, files = packed(*parent, digits, METHODS["sparse-int8"])
    tampered = bytearray(files[WEIGHTS_FILE])
    tampered[-1] ^= 0xFF
    with pytest.raises(IntegrityError, match="sha256"):
        artifacts.materialize(manifest, {**files, WEIGHTS_FILE: bytes(tampered)})


def restored(manifest, files, change):
    """Re-pack the stored tensors after ``change`` with a consistent sha256 (a buggy writer)."""
    tensors = st_load(files[WEIGHTS_FILE])
    change(tensors)
    new_files, new_manifest = artifacts.pack(
        tensors, manifest.arch, manifest.config, format=manifest.format
    )
    return new_manifest, new_files


def test_a_missing_tensor_is_an_integrity_error_naming_it(parent, digits):
    manifest, files = restored(
        *packed(*parent, digits, METHODS["int8"])[1:], lambda t: t.pop("head.weight.scale")
    )
    with pytest.raises(IntegrityError, match="head.weight"):
        artifacts.materialize(manifest, files)


def test_an_unexpected_tensor_is_an_integrity_error_naming_it(parent, digits):
    manifest, files = restored(
        *packed(*parent, digits, METHODS["sparse"])[1:], lambda t: t.update(extra=torch.zeros(1))
    )
    with pytest.raises(IntegrityError, match="extra"):
        artifacts.materialize(manifest, files)


def test_values_that_do_not_match_the_mask_are_refused():
    skeleton = {"w": torch.zeros(2, 8)}
    mask = torch.zeros(16, dtype=torch.bool)
    mask[:3] = True
    stored = {"w.mask": pack_mask(mask), "w.values": torch.ones(4)}
    with pytest.raises(IntegrityError, match="3 expected"):
        decode(skeleton, stored)


def test_masks_pack_to_one_bit_per_element_and_back():
    mask = torch.rand(37) > 0.5
    packed_mask = pack_mask(mask)
    assert packed_mask.numel() == 5
    assert torch.equal(unpack_mask(packed_mask, 37, "m"), mask)


def dense(change):
    """A small MLP packed dense after ``change`` to its state (a writer other than ours)."""
    state = dict(zoo.build("mlp", {}, seed=0).state_dict())
    change(state)
    files, manifest = artifacts.pack(state, "mlp", {})
    return manifest, files


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_dense_weights_of_another_float_width_load_as_float32_and_serve_float32_input(dtype):
    def widen(state):
        state.update({k: v.to(dtype) for k, v in state.items()})

    model = artifacts.materialize(*dense(widen))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model(torch.zeros(2, 64)).shape == (2, 10)


def test_dense_weights_of_another_kind_are_refused_naming_the_tensor():
    def as_bool(state):
        state["head.weight"] = state["head.weight"] > 0

    with pytest.raises(InvalidArgument, match=r"'head.weight' is torch.bool; a mlp model holds"):
        artifacts.materialize(*dense(as_bool))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_weights_holding_nan_or_infinity_are_refused_when_loaded(value):
    def spoil(state):
        state["head.bias"][0] = value

    with pytest.raises(InvalidArgument, match=r"'head.bias' holds NaN or infinite values"):
        artifacts.materialize(*dense(spoil))
