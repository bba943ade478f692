"""Registering and loading a large model through the registry, beside raw S3 on the same bytes.

Prints one JSON document with, for a model of ``--size-mb`` float32 weights (median of
``--repeats`` rounds, raw and registry interleaved so they share the machine's state):
  - raw_put / raw_get:   ObjectStore.put_bytes / get_bytes of the safetensors bytes (the peer),
  - register:            RegistryClient.register_files: stream through the registry, which hashes
                         into S3, writes the manifest and commits the version,
  - load:                RegistryClient.fetch: resolve the version, read every file from S3 and
                         verify it against the registered sha256,
  - register_from_module / load_to_module: the same including packing the nn.Module into
                         safetensors / rebuilding the module from them (torch work, for context),
the ratios to raw (the issue's target is >= 0.8), and the registry server's peak RSS against the
budget of 2 x model size + 300 MB.

    python -m bench.registry [--size-mb 100] [--repeats 3]

Uses the stack MAAS_* points at when MAAS_BENCH_USE_RUNNING_STACK=1, else starts a private one;
the registry server is always a fresh process of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import psutil

from bench.procstats import peak_rss_bytes
from infra.ephemeral import bench_settings
from infra.harness.registry import RegistryProcess
from maas import zoo
from maas.artifacts import pack
from maas.config import Settings
from maas.manifest import WEIGHTS_FILE
from maas.registry import RegistryClient
from maas.store import MODELS_BUCKET, ObjectStore

MB = 1024 * 1024
TARGET_VS_RAW = 0.8


def model_config(size_mb: float) -> dict[str, Any]:
    """An mlp whose float32 weights take about ``size_mb`` (one wide hidden layer)."""
    in_features, classes = 1024, 10
    hidden = int(size_mb * MB / 4 / (in_features + 1 + classes))
    return {"in_features": in_features, "hidden": [hidden], "num_classes": classes}


class PeakRss:
    """The highest RSS of a process: the kernel's high-water mark, or sampling where absent."""

    def __init__(self, pid: int, interval_s: float = 0.005) -> None:
        self._process = psutil.Process(pid)
        self._interval_s = interval_s
        self.sampled = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(psutil.Error):
                self.sampled = max(self.sampled, self._process.memory_info().rss)
            time.sleep(self._interval_s)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def peak_bytes(self) -> int:
        return max(self.sampled, peak_rss_bytes(self._process.pid) or 0)


@contextlib.contextmanager
def registry_server(settings: Settings, workdir: Path) -> Iterator[tuple[Settings, int]]:
    """A registry process of its own; yields client settings and its PID."""
    registry = RegistryProcess(
        settings,
        workdir,
        MAAS_KAFKA_BOOTSTRAP=settings.kafka_bootstrap,
        MAAS_S3_ENDPOINT=settings.s3_endpoint,
    )
    registry.start(timeout_s=120)
    try:
        pid = registry.pid
        assert pid is not None, "the registry exited at start"
        yield registry.settings, pid
    finally:
        registry.stop()


async def measure(settings: Settings, size_mb: float, repeats: int, pid: int) -> dict[str, Any]:
    config = model_config(size_mb)
    module = zoo.build("mlp", config)
    files, manifest = pack(module, "mlp", config)
    weights = files[WEIGHTS_FILE]
    nbytes = len(weights)
    store = ObjectStore(settings)
    name = f"bench-{uuid.uuid4().hex[:8]}"
    raw_key = f"bench-raw/{name}/{WEIGHTS_FILE}"
    seconds: dict[str, list[float]] = {
        k: []
        for k in (
            "raw_put",
            "register",
            "raw_get",
            "load",
            "register_from_module",
            "load_to_module",
        )
    }

    async def clocked(key: str, fn: Callable[[], Awaitable[Any]]) -> Any:
        start = time.perf_counter()
        result = await fn()
        seconds[key].append(time.perf_counter() - start)
        return result

    def pairs(round_: int, *steps: tuple[str, Callable[[], Awaitable[Any]]]) -> list[Any]:
        # Raw first in even rounds, registry first in odd ones: neither always runs right
        # after the other's writes (the S3 server flushes in the background).
        return list(steps if round_ % 2 == 0 else reversed(steps))

    with PeakRss(pid) as rss:
        async with RegistryClient(settings, actor="bench") as client:
            for round_ in range(repeats):
                registered = {}
                for key, fn in pairs(
                    round_,
                    (
                        "raw_put",
                        partial(
                            asyncio.to_thread, store.put_bytes, MODELS_BUCKET, raw_key, weights
                        ),
                    ),
                    ("register", partial(client.register_files, name, files, manifest.to_json())),
                ):
                    registered[key] = await clocked(key, fn)
                version = registered["register"]
                for key, fn in pairs(
                    round_,
                    (
                        "raw_get",
                        partial(asyncio.to_thread, store.get_bytes, MODELS_BUCKET, raw_key),
                    ),
                    ("load", partial(client.fetch, version.ref)),
                ):
                    await clocked(key, fn)
                from_module = await clocked(
                    "register_from_module", partial(client.register, module, name, "mlp", config)
                )
                await clocked("load_to_module", partial(client.load, version.ref))
                for done in (version, from_module):
                    await client.delete_version(name, done.version)
    store.delete_prefix(MODELS_BUCKET, f"bench-raw/{name}/")
    rates = {k: round(nbytes / MB / statistics.median(v), 1) for k, v in seconds.items()}
    peak_mb = rss.peak_bytes() / MB
    budget_mb = 2 * nbytes / MB + 300
    return {
        "bench": "registry",
        "model_mb": round(nbytes / MB, 1),
        "repeats": repeats,
        **{f"{k}_mb_s": v for k, v in rates.items()},
        "register_vs_raw_put": round(rates["register"] / rates["raw_put"], 3),
        "load_vs_raw_get": round(rates["load"] / rates["raw_get"], 3),
        "target_vs_raw": TARGET_VS_RAW,
        "registry_peak_rss_mb": round(peak_mb, 1),
        "registry_rss_budget_mb": round(budget_mb, 1),
        "rss_within_budget": peak_mb < budget_mb,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--size-mb", type=float, default=100.0, help="model weights, MiB")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; rates are medians")
    args = parser.parse_args(argv)
    with (
        tempfile.TemporaryDirectory(prefix="maas-bench-registry-") as tmp,
        bench_settings(Path(tmp)) as settings,
        registry_server(settings, Path(tmp) / "registry") as (client_settings, pid),
    ):
        result = asyncio.run(measure(client_settings, args.size_mb, args.repeats, pid))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
