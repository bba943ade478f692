"""The local stack's side of auth: which token table and token each service process gets, and
its state directory kept from other users."""

from __future__ import annotations

from pathlib import Path

from infra.stack import compose_services, keep_private
from maas.config import Settings


def test_each_service_gets_the_stack_table_and_its_own_token_file(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("MAAS_AUTH_TOKEN", "maas_from-the-users-shell")
    monkeypatch.setenv("MAAS_AUTH_TOKEN_FILE", "/home/me/reader.token")
    settings = Settings(state_dir=str(tmp_path))
    services = {s.name: s.env for s in compose_services(settings, tmp_path / "stack")}
    assert {"model-registry", "inference", "compressor"} <= set(services)
    for name, env in services.items():
        assert env["MAAS_AUTH_TOKENS_FILE"] == str(tmp_path / "auth" / "tokens.json"), name
        expected = "inference.token" if name == "inference" else "services.token"
        assert env["MAAS_AUTH_TOKEN_FILE"] == str(tmp_path / "auth" / expected), name
        assert env["MAAS_AUTH_TOKEN"] == "", f"{name} would run as the user's token"
        assert env["MAAS_METRICS_BIND"] == "127.0.0.1", name


def test_a_token_table_set_elsewhere_keeps_the_tokens_next_to_it(tmp_path: Path):
    table = tmp_path / "secrets" / "tokens.json"
    settings = Settings(state_dir=str(tmp_path / "state"), auth_tokens_file=str(table))
    (registry,) = [s for s in compose_services(settings, tmp_path) if s.name == "model-registry"]
    assert registry.env["MAAS_AUTH_TOKENS_FILE"] == str(table)
    assert registry.env["MAAS_AUTH_TOKEN_FILE"] == str(table.parent / "services.token")


def test_a_new_state_directory_is_its_owners_alone(tmp_path: Path):
    state = tmp_path / "a" / "state"
    keep_private(state)
    assert state.stat().st_mode & 0o777 == 0o700


def test_a_state_directory_others_could_read_is_closed_to_them(tmp_path: Path):
    # Under it, the registry database and the S3 objects are 0644, Kafka's logs too.
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    state.chmod(0o755)
    keep_private(state)
    assert state.stat().st_mode & 0o777 == 0o700
