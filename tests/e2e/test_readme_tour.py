"""The README's "A short tour", run as written: every `maas` line of its shell block, in order,
on a fresh private stack (its own state dir, free ports on 127.0.0.1), each exiting 0 and
printing what the tour promises. The commands are read from README.md, so a change to the tour
that stops working fails here."""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.proc import ManagedProcess

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
COMPOSE = ROOT / "docker-compose.yml"
# The tour's only lines that are not `maas` commands: the test already runs inside the venv.
NOT_MAAS = {"bash infra/dev.sh shell"}
COMMAND_TIMEOUT_S = 600
# The `maas` script of the venv running the tests (pyproject's [project.scripts]).
MAAS = str(Path(sys.executable).with_name("maas"))


def tour_lines(readme: str = README.read_text()) -> list[str]:
    """The shell lines of the first bash block under "## A short tour", comments stripped."""
    section = readme.split("## A short tour", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "README's tour has no ```bash block"
    lines = [line.split("#", 1)[0].strip() for line in block.group(1).splitlines()]
    return [line for line in lines if line]


def free_block(size: int) -> int:
    """A port p such that p..p+size-1 are all free on 127.0.0.1 (Kafka's controller port and
    SeaweedFS's internal ports follow the client port)."""
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + size < 65000 and all(_free(base + i) for i in range(size)):
            return base
    raise RuntimeError(f"no {size} consecutive free ports")


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def metrics_port_knobs() -> list[str]:
    """Every MAAS_PORT_*_METRICS compose reads: the local stack takes its metrics ports there."""
    return sorted(set(re.findall(r"\$\{(MAAS_PORT_\w+_METRICS)", COMPOSE.read_text())))


def private_env(state_dir: Path) -> dict[str, str]:
    """The user's environment moved onto a stack nobody else uses; no token from outside."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAAS_AUTH_TOKEN")}
    env.pop("MAAS_MEMBER_ID", None)
    kafka, s3 = free_block(2), free_block(8)
    registry, inference, http = free_block(1), free_block(1), free_block(1)
    env.update(
        MAAS_STATE_DIR=str(state_dir),
        MAAS_KAFKA_BOOTSTRAP=f"127.0.0.1:{kafka}",
        MAAS_S3_ENDPOINT=f"127.0.0.1:{s3}",
        MAAS_REGISTRY_LISTEN=f"127.0.0.1:{registry}",
        MAAS_REGISTRY_ADDR=f"127.0.0.1:{registry}",
        MAAS_INFERENCE_LISTEN=f"127.0.0.1:{inference}",
        MAAS_INFERENCE_ADDR=f"127.0.0.1:{inference}",
        MAAS_INFERENCE_HTTP_LISTEN=f"127.0.0.1:{http}",
        PYTHONUNBUFFERED="1",
    )
    for knob in metrics_port_knobs():
        env[knob] = str(free_block(4))  # replicas take port + index
    return env


class Tour:
    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.seconds: dict[str, float] = {}  # reported, never asserted

    def run(self, line: str) -> str:
        argv = shlex.split(line)
        assert argv[0] == "maas", line
        started = time.monotonic()
        done = subprocess.run(
            [MAAS, *argv[1:]],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
        )
        self.seconds[line] = time.monotonic() - started
        print(f"{self.seconds[line]:6.1f} s  {line}")
        output = done.stdout + done.stderr
        assert done.returncode == 0, f"`{line}` exited {done.returncode}:\n{output}"
        return output


@pytest.fixture(scope="module")
def tour(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tour]:
    state_dir = tmp_path_factory.mktemp("readme-tour")
    tour = Tour(private_env(state_dir))
    try:
        yield tour
    finally:
        stop_leftovers(tour, state_dir / "stack")


def stop_leftovers(tour: Tour, stack_dir: Path) -> None:
    """Whatever the tour left running (it failed before `maas stack down`), stopped by the
    PIDs in its own stack dir."""
    subprocess.run(
        [MAAS, "stack", "down"],
        cwd=ROOT,
        env=tour.env,
        capture_output=True,
        timeout=120,
    )
    for pid_file in stack_dir.glob("*.pid"):
        name = pid_file.stem
        ManagedProcess(
            name=name,
            pid_file=pid_file,
            log_file=stack_dir / f"{name}.log",
            marker=str(stack_dir.parent),
        ).stop(timeout_s=10.0)


# --- what each command promises -----------------------------------------------------------------


def job_file(argv: list[str]) -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / argv[3]).read_text()))


def check(argv: list[str], output: str, seen: dict[str, Any]) -> None:
    """The key words of each kind of tour command, and the facts the README states in prose."""
    verb = tuple(argv[1:3])
    if verb == ("stack", "up"):
        rows = [r for r in output.splitlines() if r and not r.startswith(("COMPONENT", "state:"))]
        assert rows and all(" healthy " in f" {r} " for r in rows), output
        for service in ("model-registry", "inference", "compressor", "training-coordinator"):
            assert service in output
    elif verb == ("stack", "down"):
        assert output.startswith("stopped: ") and "model-registry" in output, output
    elif verb == ("jobs", "submit"):
        job = job_file(argv)
        assert "succeeded" in output and "-> model" in output, output
        name = (job.get("register_as") or job.get("base") or {})["name"]
        assert f"{name}@" in output, output
    elif verb[0] == "models" and verb[1] == "list":
        header, *versions = output.splitlines()
        assert header.split()[:2] == ["VERSION", "ALIASES"] and versions, output
        seen.setdefault("listed", []).append(len(versions))
    elif verb[0] == "models" and verb[1] == "show":
        shown = json.loads(output)
        name, _, alias = argv[3].partition("@")
        assert shown["name"] == name
        if alias:
            assert alias in shown["aliases"], shown
        seen[argv[3]] = shown["version"]
    elif verb[0] == "models" and verb[1] == "alias":
        name, version, alias = argv[3:6]
        assert f"{name}@{alias} -> {version}" in output, output
        seen[f"{name}@{alias}"] = int(version)
    elif verb[0] == "predict":
        answer = json.loads(output)
        ref = argv[2]
        name, _, alias = ref.partition("@")
        assert answer["model"] == name
        # A bare name serves production; an alias its version.
        expected = seen.get(ref if alias else f"{name}@production")
        if expected is not None:
            assert answer["version"] == expected, (ref, answer["version"], seen)
        (label,) = answer["argmax"]
        assert 0 <= label <= 9
    else:
        raise AssertionError(f"the tour test has no expectation for {' '.join(argv)}; add one")


# --- the test -------------------------------------------------------------------------------------


def test_the_tour_has_only_maas_commands_besides_the_dev_shell() -> None:
    lines = tour_lines()
    assert [line for line in lines if not line.startswith("maas ")] == sorted(NOT_MAAS)
    assert lines[-1] == "maas stack down"


def test_the_readme_tour_runs_as_written(tour: Tour) -> None:
    seen: dict[str, Any] = {}
    for line in tour_lines():
        if line in NOT_MAAS:
            continue
        argv = shlex.split(line)
        check(argv, tour.run(line), seen)
    # "On a fresh stack the trained model is version 1 and the compressed variants follow it".
    assert seen.get("digits-mlp@staging") == 1, seen
    first, *later = seen["listed"]
    assert later and later[-1] > first, "the compressed variants are not in the second list"
