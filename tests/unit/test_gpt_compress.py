"""Compression applies to the GPT: the compressor's own quantize step and measurement give an
int8 variant that the shared loader builds as a GPT, measured beside its fp32 parent."""

from __future__ import annotations

import numpy as np
import pytest

from maas import artifacts, zoo
from maas.compression.measure import artifact_metrics
from maas.compression.pipeline import parent_variant, parse_method, run
from maas.compression.train import FitConfig, Tensors, fit
from maas.datasets import load_builtin
from maas.text.gpt import GPT
from maas.text.sampling import SamplingParams, generate

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIG = {"block_size": 128, "n_layer": 2, "n_head": 2, "n_embd": 32}


@pytest.fixture(scope="module")
def data() -> Tensors:
    full = load_builtin("python-stdlib").subset(0.1, seed=0)
    t = Tensors.of(full)
    return Tensors(t.x_train, t.y_train, t.x_test[:32], t.y_test[:32], t.task)


@pytest.fixture(scope="module")
def parent(data: Tensors) -> GPT:
    model = zoo.build("gpt", CONFIG, seed=2)
    fit(model, data, FitConfig(steps=15, batch_size=4, lr=0.02, seed=0))
    assert isinstance(model, GPT)
    return model


def _int8(parent: GPT, data: Tensors) -> tuple[dict[str, bytes], artifacts.Manifest]:
    plan = parse_method({"quantize": {"dtype": "int8"}})
    variant = run(plan, parent_variant(parent, "gpt", CONFIG), data, FitConfig(steps=0))
    fmt, stored = variant.encode()
    return artifacts.pack(stored, "gpt", CONFIG, format=fmt)


def test_an_int8_variant_is_measured_beside_fp32_and_still_generates(
    parent: GPT, data: Tensors
) -> None:
    files, manifest = _int8(parent, data)
    dense_files, dense_manifest = artifacts.pack(parent, "gpt", CONFIG)
    int8 = artifact_metrics(manifest, files, data, latency_repeats=0)
    fp32 = artifact_metrics(dense_manifest, dense_files, data, latency_repeats=0)
    assert manifest.format == "int8"
    assert fp32["loss"] < np.log(257) - 0.5  # it learned something
    assert int8["loss"] == pytest.approx(fp32["loss"], abs=0.05)
    assert int8["artifact_bytes"] < 0.6 * fp32["artifact_bytes"]
    served = artifacts.materialize(manifest, files)
    assert isinstance(served, GPT)
    tokens = list(generate(served, "def ", SamplingParams(max_tokens=6, temperature=0)))
    assert 1 <= len(tokens) <= 6 and tokens[-1].finish is not None
