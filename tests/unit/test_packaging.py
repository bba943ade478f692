"""The package and its set-up: pyproject.toml declares every third-party distribution the platform
imports, the locks pin each declared range, and a CPU machine gets torch without the CUDA-only
wheels (infra/dev.sh picks the flavour). tests/integration/test_install.py installs the wheel.
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
PLATFORM_CODE = (ROOT / "shared" / "maas", ROOT / "services", ROOT / "infra")
FIRST_PARTY = {"maas", "services", "infra"}
# Developer tools inside the package, run from a checkout with the `dev` extra.
DEV_ONLY = {ROOT / "shared" / "maas" / "protogen.py"}
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def declared(group: str | None = None) -> dict[str, Requirement]:
    lines = (
        PYPROJECT["dependencies"] if group is None else PYPROJECT["optional-dependencies"][group]
    )
    return {canonicalize_name(r.name): r for r in map(Requirement, lines)}


def pins(lock: str) -> dict[str, str]:
    found = re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)", (ROOT / lock).read_text(), re.MULTILINE)
    return {canonicalize_name(name): version for name, version in found}


def imported_top_level_names(path: Path) -> set[str]:
    """Every absolute import in a file, lazy ones inside functions included."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def third_party_imports() -> dict[str, Path]:
    """Top-level module name -> one file of the platform that imports it."""
    found: dict[str, Path] = {}
    for root in PLATFORM_CODE:
        for path in sorted(root.rglob("*.py")):
            if path in DEV_ONLY or "_pb2" in path.name:
                continue
            for name in imported_top_level_names(path) - FIRST_PARTY:
                if name not in sys.stdlib_module_names:
                    found.setdefault(name, path)
    return found


def test_every_third_party_import_of_the_platform_is_a_declared_dependency():
    distributions = importlib.metadata.packages_distributions()
    runtime = declared()
    undeclared = []
    for module, path in third_party_imports().items():
        owners = {canonicalize_name(d) for d in distributions.get(module, [])}
        if not owners & runtime.keys():
            where = path.relative_to(ROOT)
            undeclared.append(f"{module} (from {sorted(owners) or 'nothing installed'}) in {where}")
    assert undeclared == []


@pytest.mark.parametrize(
    ("group", "lock"),
    [
        (None, "requirements.lock"),
        ("test", "requirements.lock"),
        ("dev", "requirements.lock"),
        ("minilm", "requirements.lock"),
        ("cuda", "requirements-cuda.lock"),
    ],
)
def test_the_lock_pins_every_declared_dependency_inside_its_range(group, lock):
    pinned = pins(lock)
    outside = [
        f"{name}: {pinned.get(name, 'not pinned')} vs {requirement.specifier or 'any'}"
        for name, requirement in declared(group).items()
        if name not in pinned or not requirement.specifier.contains(pinned[name], prereleases=True)
    ]
    assert outside == []


def test_the_cpu_lock_leaves_every_cuda_only_wheel_out():
    cuda_only = pins("requirements-cuda.lock")
    assert "triton" in cuda_only
    assert sorted(cuda_only.keys() & pins("requirements.lock").keys()) == []


def dev_sh_function(*names: str) -> str:
    text = (ROOT / "infra" / "dev.sh").read_text()
    bodies = [
        re.search(rf"^{name}\(\) {{.*?^}}$", text, re.MULTILINE | re.DOTALL) for name in names
    ]
    assert all(bodies), f"infra/dev.sh defines {names}"
    return "\n".join(body.group(0) for body in bodies if body)


def torch_flavour(
    tmp_path: Path, gpu: bool, choice: str | None
) -> subprocess.CompletedProcess[str]:
    """infra/dev.sh's torch_flavour with a stand-in nvidia-smi that finds a GPU or none."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\nexit {0 if gpu else 9}\n")
    smi.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "MAAS_TORCH"}
    env["PATH"] = f"{bin_dir}:/usr/bin:/bin"
    if choice is not None:
        env["MAAS_TORCH"] = choice
    script = dev_sh_function("log", "torch_flavour") + "\ntorch_flavour\n"
    return subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True)


@pytest.mark.parametrize(
    ("gpu", "choice", "flavour"),
    [
        (False, None, "cpu"),
        (True, None, "cuda"),
        (False, "auto", "cpu"),
        (False, "cuda", "cuda"),
        (True, "cpu", "cpu"),
    ],
)
def test_set_up_installs_cuda_wheels_only_with_a_gpu_or_when_asked(tmp_path, gpu, choice, flavour):
    done = torch_flavour(tmp_path, gpu, choice)
    assert (done.returncode, done.stdout) == (0, flavour)


def test_an_unknown_torch_flavour_is_refused_naming_the_accepted_ones(tmp_path):
    done = torch_flavour(tmp_path, gpu=False, choice="rocm")
    assert done.returncode == 2
    assert "MAAS_TORCH=rocm is unknown; use cpu, cuda or auto" in done.stderr
