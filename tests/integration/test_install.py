"""`pip install .` gives a working `maas`: the wheel built from this tree, installed into a fresh
venv, runs from that venv alone — the checkout off sys.path, the schemas, example jobs and the
compose file read from the installed copy.

The wheel goes in with --no-deps and the fresh venv sees this environment's site-packages through a
.pth file, so no index is needed; tests/unit/test_packaging.py checks that every distribution the
platform imports is declared in pyproject.toml and pinned by the lock within its range.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
PIP = (sys.executable, "-m", "pip")
# What the build reads: the packages, and the files their links (shared/maas/schemas, ...) point at.
SOURCES = (
    *("pyproject.toml", "README.md", "shared", "services", "infra"),
    *("schemas", "examples", "docker-compose.yml"),
)


@dataclass(frozen=True)
class Venv:
    root: Path
    purelib: Path
    workdir: Path

    def run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        env["PATH"] = f"{self.root / 'bin'}:{env.get('PATH', '')}"
        env["VIRTUAL_ENV"] = str(self.root)
        return subprocess.run(
            argv, cwd=self.workdir, env=env, capture_output=True, text=True, timeout=120
        )

    def python(self, code: str) -> subprocess.CompletedProcess[str]:
        return self.run(str(self.root / "bin" / "python"), "-c", code)


def build_wheel(tmp: Path) -> Path:
    source = tmp / "source"
    source.mkdir()
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "build", "*.egg-info")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, symlinks=True, ignore=skip)
        else:
            shutil.copy2(path, source / name)
    dist = tmp / "dist"
    subprocess.run(
        [*PIP, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist), str(source)],
        check=True,
        capture_output=True,
    )
    (wheel,) = dist.glob("maas-*.whl")
    return wheel


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Iterator[Venv]:
    tmp = tmp_path_factory.mktemp("install")
    wheel = build_wheel(tmp)
    root = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / "bin" / "python"
    purelib = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    (purelib / "_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [*PIP, "--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
    )
    workdir = tmp / "elsewhere"
    workdir.mkdir()
    yield Venv(root, purelib, workdir)


def test_the_installed_packages_are_the_venvs_copies_not_the_checkout(venv):
    done = venv.python("import maas, services, infra; print(maas.__file__, services.__file__)")
    assert done.returncode == 0, done.stderr
    assert all(Path(p).is_relative_to(venv.purelib) for p in done.stdout.split())


@pytest.mark.parametrize(
    "argv", [["--help"], ["models", "list", "--help"], ["stack", "up", "--help"]], ids=" ".join
)
def test_the_maas_script_answers(venv, argv):
    done = venv.run("maas", *argv)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: maas")


def test_an_example_job_shipped_in_the_wheel_passes_the_dry_run(venv):
    example = venv.purelib / "maas" / "examples" / "jobs" / "seed-convnet-mse.yaml"
    done = venv.run("maas", "jobs", "submit", str(example), "--dry-run")
    assert done.returncode == 0, done.stderr


def test_a_typo_is_refused_by_the_schemas_shipped_in_the_wheel(venv):
    job = venv.workdir / "typo.yaml"
    job.write_text(
        "type: train\nmodel: {name: m, arch: mlp}\n"
        "dataset: {uri: 'builtin:digits'}\ntrainig: {steps: 5}\n"
    )
    done = venv.run("maas", "jobs", "submit", str(job), "--dry-run")
    assert done.returncode != 0
    assert "trainig: unknown key; did you mean 'training'?" in done.stderr


def test_the_local_stack_reads_the_compose_file_shipped_in_the_wheel(venv):
    done = venv.python(
        "from infra import compose; print(compose.COMPOSE_FILE.is_file(), "
        "'inference' in compose.load_compose()['services'])"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "True"]
