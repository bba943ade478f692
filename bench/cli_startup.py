"""How long the `maas` command takes before it does anything, beside a bare interpreter.

Prints one JSON document: best-of-``--repeats`` wall seconds of fresh processes for
  - python_bare:        ``python -c pass`` (the peer: what no CLI can go below),
  - import_torch:       ``python -c "import torch"`` (what every command paid before issue 14),
  - maas_help:          ``maas --help``,
  - maas_models_help:   ``maas models --help``,
  - maas_jobs_dry_run:  ``maas jobs submit examples/jobs/train-digits-mlp.yaml --dry-run``
                        (judges the job: schema, zoo, parameter count; still no torch),
and the heavy modules each command loaded. Timings swing with load: run it on an idle machine.

    python -m bench.cli_startup [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    figures: dict[str, object] = {
        "python_bare_s": best_wall_s("pass", args.repeats)[0],
        "import_torch_s": best_wall_s("import torch", args.repeats)[0],
    }
    for name, argv in COMMANDS.items():
        wall, loaded = best_wall_s(PROBE.format(argv=argv, heavy=HEAVY), args.repeats)
        figures[f"{name}_s"] = wall
        figures[f"{name}_heavy_modules"] = loaded.split(",") if loaded else []
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()}))


if __name__ == "__main__":
    main()
