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
PORT_VAR = "MAAS_PORT_"
COMPOSE_VAR = "MAAS_COMPOSE_"  # this file's own knobs (endpoints, published/advertised host)
# Loopback by default, host port from a MAAS_PORT_* variable with a numeric default.
_PUBLISHED = re.compile(
    r"^(?:127\.0\.0\.1|\$\{MAAS_COMPOSE_PUBLISH_HOST:-127\.0\.0\.1\}):"
    r"\$\{(MAAS_PORT_[A-Z0-9_]+):-\d+\}:\S+$"
)


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
    # MAAS_PORT_* and MAAS_COMPOSE_* are compose's own knobs (tests below), not settings.
    maas_names = {
        n for n in names if n.startswith("MAAS_") and not n.startswith((PORT_VAR, COMPOSE_VAR))
    }
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


def test_every_published_port_comes_from_an_env_variable_with_a_default(
    compose: dict[str, Any],
) -> None:
    published = [
        (name, str(entry))
        for name, svc in compose["services"].items()
        for entry in svc.get("ports") or ()
    ]
    assert published, "compose publishes no ports at all"
    fixed = [(name, entry) for name, entry in published if not _PUBLISHED.match(entry)]
    assert not fixed, f"publish as 127.0.0.1:${{MAAS_PORT_*:-default}}:PORT, not {fixed}"
    variables = [_PUBLISHED.match(entry).group(1) for _, entry in published]  # type: ignore[union-attr]
    assert len(set(variables)) == len(variables), "two published ports share one variable"


def test_every_metrics_port_a_service_opens_comes_from_an_env_variable(
    compose: dict[str, Any],
) -> None:
    fixed = [
        (name, value)
        for name, svc in compose["services"].items()
        for var, value in (svc.get("environment") or {}).items()
        if var.endswith("METRICS_PORT") and not str(value).startswith("${" + PORT_VAR)
    ]
    assert not fixed, f"metrics ports must be ${{MAAS_PORT_*:-default}} (side by side): {fixed}"


def test_every_service_is_authenticated_by_default_and_inference_only_reads(
    compose: dict[str, Any],
) -> None:
    services = {
        name: svc
        for name, svc in compose["services"].items()
        if any(m.startswith("services.") for m in _python_m_modules(svc.get("command")))
    }
    assert services
    for name, svc in services.items():
        env = svc["environment"]
        assert env["MAAS_AUTH"] == "${MAAS_AUTH:-on}", name
        assert env["MAAS_AUTH_TOKENS_FILE"] == "/var/lib/maas-auth/tokens.json", name
        assert "maas-auth:/var/lib/maas-auth:ro" in svc["volumes"], name
        assert "MAAS_AUTH_TOKEN" not in env, f"{name}: a token value in compose is a leak"
    assert services["inference"]["environment"]["MAAS_AUTH_TOKEN_FILE"].endswith("inference.token")
    init = compose["services"]["auth-init"]
    assert _python_m_modules(init["command"]) == ["maas.edge"]


def test_only_the_broker_and_s3_may_be_opened_beyond_loopback(compose: dict[str, Any]) -> None:
    opened = sorted(
        name
        for name, svc in compose["services"].items()
        for entry in svc.get("ports") or ()
        if str(entry).startswith("${" + COMPOSE_VAR)
    )
    assert opened == ["kafka", "minio"]


def test_the_brokers_host_listener_advertises_the_host_members_dial(
    compose: dict[str, Any],
) -> None:
    advertised = compose["services"]["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    assert "PLAINTEXT://kafka:9092" in advertised.split(",")
    assert "HOST://${MAAS_COMPOSE_ADVERTISED_HOST:-127.0.0.1}:${MAAS_PORT_KAFKA:-9094}" in (
        advertised.split(",")
    )


def test_the_services_endpoints_default_to_compose_and_follow_the_knobs(
    compose: dict[str, Any],
) -> None:
    from infra.compose import _substitute

    env = compose["x-maas-env"]
    defaults = {k: _substitute(v, {}) for k, v in env.items()}
    assert (defaults["MAAS_KAFKA_BOOTSTRAP"], defaults["MAAS_S3_ENDPOINT"]) == (
        "kafka:9092",
        "minio:9000",
    )
    assert defaults["MAAS_S3_SECURE"] == "false"
    external = {
        "MAAS_COMPOSE_KAFKA_BOOTSTRAP": "k0.prod:9092,k1.prod:9092",
        "MAAS_COMPOSE_S3_ENDPOINT": "minio.prod:443",
        "MAAS_S3_SECURE": "true",
    }
    moved = {k: _substitute(v, external) for k, v in env.items()}
    assert (moved["MAAS_KAFKA_BOOTSTRAP"], moved["MAAS_S3_ENDPOINT"], moved["MAAS_S3_SECURE"]) == (
        "k0.prod:9092,k1.prod:9092",
        "minio.prod:443",
        "true",
    )


def test_inference_publishes_no_port_a_second_replica_would_collide_on(
    compose: dict[str, Any],
) -> None:
    # Each published port is one MAAS_PORT_* knob a range can replace; none is the container
    # side of an environment value (a range there would reach the service as its port).
    for entry in compose["services"]["inference"]["ports"]:
        assert str(entry).rsplit(":", 1)[1].isdigit(), entry
