"""How long the `maas` command takes before it does anything, beside a bare interpreter.

Prints one JSON document: best-of-``--repeats`` wall seconds of fresh processes for
  - python_bare:        ``python -c pass`` (the peer: what no CLI can go below),
  - import_torch:       ``python -c "import torch"`` (what every command paid before issue 14),
  - maas_help:          ``maas --help``,
  - maas_models_help:   ``maas models --help``,
  - maas_jobs_dry_run:  ``maas jobs submit examples/jobs/train-digits-mlp.yaml --dry-run``
                        (judges the job: schema, zoo, parameter count; still no torch),
  - maas_models_list:   ``maas models list`` against a registry holding one model (with
                        ``--registry``: a private stack and registry process are started),
and the heavy modules each command loaded. Timings swing with load: run it on an idle machine.

    python -m bench.cli_startup [--repeats 5] [--registry]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "numpy", "grpc", "aiokafka", "minio")
PROBE = """
import contextlib, io, sys
from maas import cli
with contextlib.redirect_stdout(io.StringIO()):
    try:
        cli.main({argv!r})
    except SystemExit:
        pass
print(",".join(m for m in {heavy!r} if m in sys.modules))
"""
COMMANDS: dict[str, list[str]] = {
    "maas_help": ["--help"],
    "maas_models_help": ["models", "--help"],
    "maas_jobs_dry_run": ["jobs", "submit", "examples/jobs/train-digits-mlp.yaml", "--dry-run"],
}


def best_wall_s(code: str, repeats: int) -> tuple[float, str]:
    best, out = float("inf"), ""
    for _ in range(repeats):
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
        )
        best = min(best, time.perf_counter() - start)
        out = done.stdout.strip()
    return best, out


def models_list(repeats: int) -> tuple[float, str]:
    """``maas models list`` wall time against a fresh registry that holds one model."""
    from infra.ephemeral import bench_settings
    from infra.harness.serving import ServiceProcesses
    from maas import zoo
    from maas.registry import RegistryClient

    with tempfile.TemporaryDirectory(prefix="maas-bench-cli-") as tmp:
        workdir = Path(tmp)
        with bench_settings(workdir) as settings, ServiceProcesses(workdir) as processes:
            addr = processes.start_registry()

            async def one_model() -> None:
                async with RegistryClient(settings.replace(registry_addr=addr)) as client:
                    await client.register(zoo.build("mlp", {}), "bench-cli", "mlp", {})

            asyncio.run(one_model())
            os.environ["MAAS_REGISTRY_ADDR"] = addr
            return best_wall_s(PROBE.format(argv=["models", "list"], heavy=HEAVY), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--registry", action="store_true", help="time `maas models list` too")
    args = parser.parse_args()
    figures: dict[str, object] = {
        "python_bare_s": best_wall_s("pass", args.repeats)[0],
        "import_torch_s": best_wall_s("import torch", args.repeats)[0],
    }
    for name, argv in COMMANDS.items():
        wall, loaded = best_wall_s(PROBE.format(argv=argv, heavy=HEAVY), args.repeats)
        figures[f"{name}_s"] = wall
        figures[f"{name}_heavy_modules"] = loaded.split(",") if loaded else []
    if args.registry:
        wall, loaded = models_list(args.repeats)
        figures["maas_models_list_s"] = wall
        figures["maas_models_list_heavy_modules"] = loaded.split(",") if loaded else []
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()}))


if __name__ == "__main__":
    main()
