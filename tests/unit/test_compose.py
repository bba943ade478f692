"""docker-compose.yml stays consistent with the code: it parses, every `python -m X` names a module
of this repo, and every MAAS_* variable it sets or interpolates is one maas.config knows."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from maas.config import known_env_names

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
_INTERPOLATED = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _module_exists(module: str) -> bool:
    parts = module.split(".")
    for base in (ROOT, ROOT / "shared"):
        path = base.joinpath(*parts)
        if path.with_suffix(".py").is_file() or (path / "__main__.py").is_file():
            return True
    return False


def _python_m_modules(command: Any) -> list[str]:
    argv = command.split() if isinstance(command, str) else list(command or [])
    return [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "-m"]


def test_compose_has_infra_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"kafka", "minio", "init"} <= set(services)
    assert services["kafka"]["image"].startswith("apache/kafka:4.")
    assert services["minio"]["image"].startswith("minio/minio")


def test_every_python_module_command_exists(compose: dict[str, Any]) -> None:
    commands = [(name, svc.get("command")) for name, svc in compose["services"].items()]
    modules = [(name, m) for name, cmd in commands for m in _python_m_modules(cmd)]
    assert ("init", "infra.bootstrap") in modules
    missing = [f"{name}: {m}" for name, m in modules if not _module_exists(m)]
    assert not missing, f"compose runs modules that do not exist: {missing}"


def test_every_maas_env_name_is_known() -> None:
    text = COMPOSE.read_text()
    data = yaml.safe_load(text)
    names: set[str] = set(_INTERPOLATED.findall(text))
    for svc in data["services"].values():
        env = svc.get("environment") or {}
        if isinstance(env, list):
            names |= {item.split("=", 1)[0] for item in env}
        else:
            names |= set(env)
    maas_names = {n for n in names if n.startswith("MAAS_")}
    assert maas_names, "compose sets no MAAS_* variables at all"
    unknown = sorted(maas_names - known_env_names())
    assert not unknown, f"compose uses env names maas.config does not know: {unknown}"


def test_kafka_limits_match_the_native_broker(compose: dict[str, Any]) -> None:
    from infra.kafka import size_limits
    from maas.config import Settings

    env = compose["services"]["kafka"]["environment"]
    limits = size_limits(Settings().kafka_max_message_bytes)
    for prop, value in limits.items():
        key = "KAFKA_" + prop.upper().replace(".", "_")
        assert int(env[key]) == value, key
