"""Metrics of an artifact as the shared loader runs it: quality, size, sparsity, CPU latency.

Everything is measured on the module ``maas.artifacts.materialize`` builds from the packed
files, so the registered metrics describe exactly what ``load(name, version)`` will serve.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping

import torch
from safetensors.torch import load as st_load
from torch import nn

from maas import artifacts, zoo
from maas.compression.formats import decode
from maas.compression.train import Tensors, evaluate
from maas.manifest import MANIFEST_FILE, WEIGHTS_FILE, Manifest
from maas.training.replica import predict

LATENCY_BATCHES = (1, 32)


def artifact_bytes(files: Mapping[str, bytes]) -> int:
    """Bytes at rest, without the manifest (its size depends on the metrics it carries)."""
    return sum(len(data) for name, data in files.items() if name != MANIFEST_FILE)


def parameter_counts(manifest: Manifest, files: Mapping[str, bytes]) -> tuple[int, int]:
    """(parameters, non-zero parameters) of the logical model the artifact encodes."""
    skeleton = zoo.build(manifest.arch, manifest.config)
    stored = st_load(bytes(files[WEIGHTS_FILE]))
    dense = stored if manifest.format == "dense" else decode(skeleton.state_dict(), stored)[0]
    names = [name for name, _ in skeleton.named_parameters()]
    total = sum(dense[name].numel() for name in names)
    nonzero = sum(int(torch.count_nonzero(dense[name])) for name in names)
    return total, nonzero


@torch.inference_mode()
def latency_ms(model: nn.Module, sample: torch.Tensor, batch: int, repeats: int) -> float:
    """Median wall time of one forward pass at ``batch`` rows of ``sample`` (real inputs: a
    text model's cost depends on its token ids), after a short warm-up."""
    x = sample[torch.arange(batch) % len(sample)]
    for _ in range(max(3, repeats // 10)):
        model(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def artifact_metrics(
    manifest: Manifest,
    files: Mapping[str, bytes],
    data: Tensors,
    *,
    latency_repeats: int = 50,
    parent: nn.Module | None = None,
) -> dict[str, float]:
    """Materialize the artifact through the shared loader and measure it: task metrics for a
    model that scores the data, the mean cosine of its embeddings to ``parent``'s for an
    encoder (a compressed one)."""
    model = artifacts.materialize(manifest, files)
    if not zoo.outputs_embeddings(manifest.arch, manifest.config):
        metrics = evaluate(model, data)
    elif parent is not None:
        metrics = {"cosine_to_parent": embedding_cosine(model, parent, data.x_test)}
    else:
        metrics = {}
    total, nonzero = parameter_counts(manifest, files)
    metrics |= {
        "artifact_bytes": float(artifact_bytes(files)),
        "parameters": float(total),
        "nonzero_parameters": float(nonzero),
    }
    if latency_repeats > 0:
        for batch in LATENCY_BATCHES:
            metrics[f"latency_b{batch}_ms"] = latency_ms(model, data.x_test, batch, latency_repeats)
    return metrics


@torch.inference_mode()
def embedding_cosine(model: nn.Module, reference: nn.Module, rows: torch.Tensor) -> float:
    """Mean cosine similarity of the two models' embeddings of ``rows``."""
    ours, theirs = predict(model.eval(), rows).float(), predict(reference.eval(), rows).float()
    return float(torch.nn.functional.cosine_similarity(ours, theirs, dim=1).mean())


def relative_metrics(variant: Mapping[str, float], parent: Mapping[str, float]) -> dict[str, float]:
    """How the variant compares with its parent measured in the same run."""
    out = {"compression_ratio": parent["artifact_bytes"] / variant["artifact_bytes"]}
    if "accuracy" in variant and "accuracy" in parent:
        out["accuracy_drop"] = parent["accuracy"] - variant["accuracy"]
    for batch in LATENCY_BATCHES:
        key = f"latency_b{batch}_ms"
        if key in variant and key in parent and variant[key] > 0:
            out[f"speedup_b{batch}"] = parent[key] / variant[key]
    return out
