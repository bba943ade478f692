"""What `maas demo` shows about a set of model versions: p50 latency over gRPC with the
unmodified tritonclient, and one table (version, method, accuracy, size, latency, lineage).
Shared by the digits and the text chapters."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from rich.table import Table

from maas.cli_jobs import console
from maas.registry.types import ModelVersion

LATENCY_REQUESTS = 50


@dataclass
class Row:
    version: ModelVersion
    p50_ms: float | None = None


def infer(
    triton: Any, client: Any, headers: dict[str, str], name: str, version: str, row: np.ndarray
) -> np.ndarray:
    metadata = client.get_model_metadata(name, version, headers=headers)
    result = client.infer(
        name, _inputs(triton, metadata, row), model_version=version, headers=headers
    )
    return np.asarray(result.as_numpy(metadata.outputs[0].name))


def _inputs(triton: Any, metadata: Any, row: np.ndarray) -> list[Any]:
    first = metadata.inputs[0]  # FP32 rows for the digits models, BYTES texts for MiniLM
    tensor = triton.InferInput(first.name, list(row.shape), first.datatype)
    tensor.set_data_from_numpy(row)
    return [tensor]


def p50_ms(
    triton: Any, client: Any, headers: dict[str, str], name: str, version: str, row: np.ndarray
) -> float:
    infer(triton, client, headers, name, version, row)  # loads the version and warms it up
    inputs = _inputs(triton, client.get_model_metadata(name, version, headers=headers), row)
    times = []
    for _ in range(LATENCY_REQUESTS):
        start = time.perf_counter()
        client.infer(name, inputs, model_version=version, headers=headers)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def print_table(
    rows: list[Row], production: ModelVersion, title: str = "digits-mlp and its variants"
) -> None:
    table = Table(title=title)
    for column in ("VERSION", "METHOD", "ACCURACY", "SIZE (KB)", "P50 gRPC (ms)", "LINEAGE"):
        table.add_column(column)
    for r in rows:
        v = r.version
        star = " *production" if v.version == production.version else ""
        table.add_row(
            f"{v.name}@{v.version}{star}",
            v.method or "",
            f"{v.metrics.get('accuracy', float('nan')):.4f}",
            f"{v.size_bytes / 1024:.1f}",
            "" if r.p50_ms is None else f"{r.p50_ms:.2f}",
            f"<- {v.parent}" if v.parent else f"job {v.job_id}",
        )
    console().print(table)
