"""The CLI builds its parser without the heavy libraries: `maas --help` and the help of every
command group import no torch, numpy, grpc or kafka client (they load when a command runs).

Checked through sys.modules in a fresh interpreter, never by timing (see bench/ for timings).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "numpy", "grpc", "aiokafka", "minio", "sklearn", "safetensors", "rich")

PROBE = """
import contextlib, io, sys
from maas import cli
with contextlib.redirect_stdout(io.StringIO()):
    try:
        cli.main({argv!r})
    except SystemExit:
        pass
print(",".join(sorted(m for m in {heavy!r} if m in sys.modules)))
"""


def heavy_modules_after(argv: list[str]) -> str:
    code = PROBE.format(argv=argv, heavy=HEAVY)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip()


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["models", "--help"],
        ["jobs", "--help"],
        ["jobs", "submit", "--help"],
        ["datasets", "--help"],
        ["predict", "--help"],
        ["demo", "--help"],
        ["stack", "--help"],
    ],
    ids=" ".join,
)
def test_help_imports_no_heavy_library(argv):
    assert heavy_modules_after(argv) == ""


def test_listing_models_needs_no_torch_s3_client_or_schema_validator():
    # The S3 client comes with the first model load, jsonschema with the first validated event.
    unused = ("torch", "numpy", "minio", "jsonschema")
    code = (
        "import sys\n"
        "import maas.cli_models, maas.registry.client\n"
        f"print(','.join(m for m in {unused!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_python_dash_m_maas_is_the_maas_command():
    out = subprocess.run(
        [sys.executable, "-m", "maas", "--help"], capture_output=True, text=True, check=True
    )
    assert out.stdout.startswith("usage: maas ")
