"""Compression variants beside the fp32 parent and torch's own dynamic quantization, in one run.

Prints one JSON document. For a ~1M-parameter MLP (Linear layers, trained on digits) and the
digits CNN, each variant the compressor can register is built, packed, loaded back through the
shared loader (``maas.artifacts.materialize``) and measured: artifact bytes, accuracy on the
held-out split, and median CPU latency at batch 1 and 32. The peer is
``torch.ao.quantization.quantize_dynamic`` applied directly to the same fp32 model.

Latencies are interleaved (every model once per round, median of round medians), so load from
other processes on the machine hits every variant alike.

    python -m bench.compress [--threads 1] [--rounds 5] [--repeats 50]

Targets checked for the MLP (reported under "targets", never asserted): int8 >= 1.5x faster
than fp32 at batch 32 and within 10% of the peer's latency; prune 80% + int8 >= 10x smaller
than fp32 within 1.5 accuracy points.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from maas import artifacts, zoo
from maas.compression.measure import LATENCY_BATCHES, artifact_bytes, latency_ms
from maas.compression.pipeline import parent_variant, parse_method, run
from maas.compression.train import FitConfig, Tensors, evaluate, fit
from maas.datasets import load_builtin

MLP_1M = {"in_features": 64, "hidden": [1024, 896], "num_classes": 10}
RECOVERY = 200
METHODS: dict[str, dict[str, Any]] = {
    "int8": {"quantize": {"dtype": "int8"}},
    "fp16": {"quantize": {"dtype": "fp16"}},
    "prune80": {"prune": {"sparsity": 0.8, "recovery_steps": RECOVERY}},
    "structured50": {"prune": {"sparsity": 0.5, "structured": True, "recovery_steps": RECOVERY}},
    "prune80+int8": {
        "chain": [
            {"prune": {"sparsity": 0.8, "recovery_steps": RECOVERY}},
            {"quantize": {"dtype": "int8"}},
        ]
    },
    "distill": {"distill": {}},
}


def peer(model: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its own deprecation notice, the reason we wrap ours
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def torch_save_bytes(model: nn.Module) -> int:
    """The peer's size as torch itself stores it (pickle; measured only, never loaded)."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def build_variants(
    arch: str, config: dict[str, Any], data: Tensors, train_steps: int
) -> tuple[dict[str, nn.Module], dict[str, dict[str, Any]]]:
    """Every variant as the shared loader returns it, and its static figures."""
    model = fit(zoo.build(arch, config, seed=0), data, FitConfig(steps=train_steps, seed=0))
    files, manifest = artifacts.pack(model, arch, config)
    modules = {"fp32": artifacts.materialize(manifest, files)}
    rows = {"fp32": {"format": "dense", "artifact_bytes": artifact_bytes(files)}}
    parent = parent_variant(model, arch, config)
    for name, item in METHODS.items():
        variant = run(parse_method(item), parent, data, FitConfig(0))
        fmt, tensors = variant.encode()
        files, manifest = artifacts.pack(tensors, variant.arch, variant.config, format=fmt)
        modules[name] = artifacts.materialize(manifest, files)
        rows[name] = {"format": fmt, "artifact_bytes": artifact_bytes(files)}
        rows[name]["parameters"] = zoo.count_parameters(zoo.build(variant.arch, variant.config))
    modules["peer_quantize_dynamic"] = peer(modules["fp32"])
    rows["peer_quantize_dynamic"] = {
        "format": "torch.save (pickle)",
        "artifact_bytes": torch_save_bytes(modules["peer_quantize_dynamic"]),
    }
    rows["fp32"]["parameters"] = zoo.count_parameters(model)
    return modules, rows


def interleaved_latency(
    modules: Mapping[str, nn.Module],
    sample: torch.Tensor,
    batch: int,
    rounds: int,
    repeats: int,
) -> dict[str, float]:
    per_round: dict[str, list[float]] = {name: [] for name in modules}
    for _ in range(rounds):
        for name, module in modules.items():
            per_round[name].append(latency_ms(module, sample, batch, repeats))
    return {name: statistics.median(times) for name, times in per_round.items()}


def measure(
    arch: str, config: dict[str, Any], data: Tensors, train_steps: int, rounds: int, repeats: int
) -> dict[str, Any]:
    modules, rows = build_variants(arch, config, data, train_steps)
    for batch in LATENCY_BATCHES:
        times = interleaved_latency(modules, data.x_test, batch, rounds, repeats)
        for name, ms in times.items():
            rows[name][f"latency_b{batch}_ms"] = round(ms, 4)
    fp32 = rows["fp32"]
    for name, module in modules.items():
        row = rows[name]
        row["accuracy"] = round(evaluate(module, data)["accuracy"], 4)
        row["size_ratio_vs_fp32"] = round(fp32["artifact_bytes"] / row["artifact_bytes"], 2)
        row["accuracy_drop_points"] = round(100 * (fp32["accuracy"] - row["accuracy"]), 2)
        for batch in LATENCY_BATCHES:
            key = f"latency_b{batch}_ms"
            row[f"speedup_b{batch}_vs_fp32"] = round(fp32[key] / row[key], 2)
    return {"arch": arch, "config": config, "variants": rows}


def targets(mlp: dict[str, Any]) -> dict[str, Any]:
    v = mlp["variants"]
    int8, fp32, peer_row, chain = (
        v["int8"],
        v["fp32"],
        v["peer_quantize_dynamic"],
        v["prune80+int8"],
    )
    speedup = fp32["latency_b32_ms"] / int8["latency_b32_ms"]
    vs_peer = int8["latency_b32_ms"] / peer_row["latency_b32_ms"]
    return {
        "int8_speedup_b32_vs_fp32": {
            "value": round(speedup, 2),
            "target": ">= 1.5",
            "met": speedup >= 1.5,
        },
        "int8_latency_b32_vs_peer": {
            "value": round(vs_peer, 3),
            "target": "<= 1.10",
            "met": vs_peer <= 1.10,
        },
        "prune80_int8_size_ratio": {
            "value": chain["size_ratio_vs_fp32"],
            "target": ">= 10",
            "met": chain["size_ratio_vs_fp32"] >= 10,
        },
        "prune80_int8_accuracy_drop_points": {
            "value": chain["accuracy_drop_points"],
            "target": "<= 1.5",
            "met": chain["accuracy_drop_points"] <= 1.5,
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=50, help="forward passes per round")
    parser.add_argument("--train-steps", type=int, default=600)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = Tensors.of(load_builtin("digits"))
    mlp = measure("mlp", MLP_1M, data, args.train_steps, args.rounds, args.repeats)
    cnn = measure("cnn", {}, data, args.train_steps, args.rounds, args.repeats)
    report = {
        "machine": {
            "torch": torch.__version__,
            "threads": args.threads,
            "quantized_engine": torch.backends.quantized.engine,
            "cpu": platform.processor() or platform.machine(),
        },
        "mlp_1m": mlp,
        "targets_mlp_1m": targets(mlp),
        "cnn_digits_report_only": cnn,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
