"""Pure parts of infra/ and the CLI: no broker, no S3 server, no processes."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from infra.bootstrap import topic_plan
from infra.kafka import KafkaBroker, size_limits
from infra.proc import ManagedProcess, split_host_port
from infra.s3 import WeedPorts, WeedS3, public_default_keys
from infra.stack import LocalStack
from maas import cli
from maas.config import Settings
from maas.topics import ALL_TOPICS

MiB = 1024 * 1024


def test_size_limits_admit_the_largest_record() -> None:
    limits = size_limits(64 * MiB)
    assert limits["message.max.bytes"] == 64 * MiB
    for key in ("replica.fetch.max.bytes", "fetch.max.bytes", "socket.request.max.bytes"):
        assert limits[key] > 64 * MiB, key


def test_server_properties_follow_settings(tmp_path: Path) -> None:
    settings = Settings(
        kafka_bootstrap="127.0.0.1:19092", kafka_max_message_bytes=8 * MiB, state_dir=str(tmp_path)
    )
    props = KafkaBroker.from_settings(settings, controller_port=19999).server_properties()
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:19092,CONTROLLER://127.0.0.1:19999"
    assert props["auto.create.topics.enable"] == "false"
    assert props["message.max.bytes"] == 8 * MiB
    assert props["log.dirs"] == str(tmp_path / "kafka" / "data")


def test_topic_plan_matches_the_design_table() -> None:
    settings = Settings(kafka_max_message_bytes=4 * MiB)
    plan = {spec.name: spec for spec in topic_plan(settings)}
    assert {t.name: t.partitions for t in ALL_TOPICS} == {n: s.partitions for n, s in plan.items()}
    assert plan["maas.jobs.v1"].partitions == 3 and plan["maas.dlq.v1"].partitions == 1
    assert all(s.configs["max.message.bytes"] == str(4 * MiB) for s in plan.values())
    assert all(s.replication_factor == 1 for s in plan.values())


def test_topic_plan_scales_replicas() -> None:
    plan = {s.name: s for s in topic_plan(Settings(), replication_factor=3)}
    assert plan["maas.jobs.v1"].partitions == 3 and plan["maas.jobs.v1"].replication_factor == 3
    assert plan["maas.jobs.v1"].configs["min.insync.replicas"] == "2"
    with pytest.raises(ValueError, match="replication_factor"):
        topic_plan(Settings(), replication_factor=0)


def test_weed_ports_are_all_configurable(tmp_path: Path) -> None:
    ports = WeedPorts(1001, 1002, 1003, 1004, 1005, 1006, 1007, 1008)
    s3 = WeedS3.from_settings(Settings(state_dir=str(tmp_path)), ports=ports)
    argv = " ".join(s3.argv(Path("/bin/weed")))
    for port in ports.all():
        assert f"={port}" in argv
    assert "-s3.port.iceberg=0" in argv and "-s3.port.lance=0" in argv
    assert WeedPorts.after(9000).all() == list(range(9000, 9008))


def test_only_the_s3_gateway_listens_beyond_loopback(tmp_path: Path) -> None:
    # The master, volume server and filer answer without credentials: loopback only, even when
    # the gateway serves a network address.
    settings = Settings(state_dir=str(tmp_path), s3_endpoint="10.1.2.3:9000")
    argv = WeedS3.from_settings(settings).argv(Path("/bin/weed"))
    assert "-ip.bind=127.0.0.1" in argv and "-ip=127.0.0.1" in argv
    assert "-s3.ip.bind=10.1.2.3" in argv
    assert not [a for a in argv if "10.1.2.3" in a and not a.startswith("-s3.")]


@pytest.mark.timeout(60)  # without its own timeout the probe waited out minio's retries
def test_a_frozen_s3_server_is_not_ready_rather_than_a_hang(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as frozen:  # accepts, never answers
        port = frozen.getsockname()[1]
        settings = Settings(state_dir=str(tmp_path), s3_endpoint=f"127.0.0.1:{port}")
        assert WeedS3.from_settings(settings).ready() is False


@pytest.mark.parametrize(
    ("endpoint", "secret", "warned"),
    [
        ("127.0.0.1:9000", "maas-secret-key", False),
        ("10.1.2.3:9000", "maas-secret-key", True),
        ("10.1.2.3:9000", "a-secret-of-ours", False),
    ],
)
def test_a_networked_s3_endpoint_with_the_default_keys_is_warned_about(
    endpoint: str, secret: str, warned: bool
) -> None:
    settings = Settings(s3_endpoint=endpoint, s3_secret_key=secret)
    assert bool(public_default_keys(settings)) is warned


def test_s3_identities_carry_the_configured_keys(tmp_path: Path) -> None:
    s3 = WeedS3.from_settings(
        Settings(state_dir=str(tmp_path), s3_access_key="ak", s3_secret_key="sk-12345678")
    )
    ident = s3.identities()["identities"][0]  # type: ignore[index]
    assert ident["credentials"] == [{"accessKey": "ak", "secretKey": "sk-12345678"}]
    assert "Admin" in ident["actions"]


def test_split_host_port() -> None:
    assert split_host_port("127.0.0.1:9092,other:9092", default_port=1) == ("127.0.0.1", 9092)
    assert split_host_port("kafka", default_port=9092) == ("kafka", 9092)
    assert split_host_port("PLAINTEXT://h:1", default_port=2) == ("h", 1)


def test_a_recycled_pid_is_never_ours(tmp_path: Path) -> None:
    pid_file = tmp_path / "x.pid"
    pid_file.write_text("1\n")  # init: alive, but its command line lacks our marker
    proc = ManagedProcess("x", pid_file, tmp_path / "x.log", marker=str(tmp_path))
    assert proc.pid() is None
    assert proc.stop() is False
    assert not pid_file.exists()


def test_status_of_a_stack_never_started(tmp_path: Path) -> None:
    stack = LocalStack.from_settings(Settings(state_dir=str(tmp_path)))
    rows = stack.status()
    assert [r.name for r in rows] == ["kafka", "s3"]
    assert not any(r.alive for r in rows)
    assert stack.down() == []


def test_cli_config_masks_secrets(capsys: pytest.CaptureFixture[str], monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("MAAS_S3_SECRET_KEY", "very-secret-value")
    assert cli.main(["config", "--doc"]) == 0
    out = capsys.readouterr().out
    assert "MAAS_S3_SECRET_KEY" in out and "very-secret-value" not in out


def test_cli_stack_status_exit_code_when_down(tmp_path: Path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("MAAS_STATE_DIR", str(tmp_path))
    assert cli.main(["stack", "status"]) == 3
    assert "kafka" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [[], ["stack"], ["stack", "up"], ["config"], ["smoke"]])
def test_every_command_has_help_with_an_example(argv: list[str]) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "maas.cli", *argv, "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "example" in out


def test_operations_doc_lists_every_infra_setting() -> None:
    # Only the stack's own settings: services document theirs, and `maas config --doc` lists all.
    from maas.config import env_doc

    doc = (Path(__file__).resolve().parents[2] / "docs" / "OPERATIONS.md").read_text()
    infra = [n for n, _, _ in env_doc() if n.startswith(("MAAS_KAFKA_", "MAAS_S3_"))]
    infra += ["MAAS_STATE_DIR", "MAAS_CACHE_DIR"]
    missing = [name for name in infra if f"`{name}`" not in doc]
    assert not missing, f"add to docs/OPERATIONS.md (see `maas config --markdown`): {missing}"


def test_managed_process_is_alive_right_after_start_and_stops(tmp_path: Path) -> None:
    marker = str(tmp_path / "marker")
    proc = ManagedProcess(
        "sleeper", tmp_path / "s.pid", tmp_path / "s.log", marker=marker, die_with_parent=True
    )
    argv = [sys.executable, "-c", "import time; time.sleep(60)", marker]
    pid = proc.start(argv, cwd=tmp_path)
    try:
        assert proc.alive() and proc.pid() == pid
        assert proc.start(argv, cwd=tmp_path) == pid  # already running: no second copy
    finally:
        assert proc.stop(timeout_s=5) is True
    assert not proc.alive() and not (tmp_path / "s.pid").exists()


def test_a_process_that_dies_at_once_is_reported_with_its_log(tmp_path: Path) -> None:
    from maas.errors import FailedPrecondition

    marker = str(tmp_path / "marker")
    proc = ManagedProcess("crasher", tmp_path / "c.pid", tmp_path / "c.log", marker=marker)
    argv = ["/bin/sh", "-c", "echo boom-from-child; exit 3", marker]
    try:
        proc.start(argv, cwd=tmp_path)
    except FailedPrecondition as exc:
        assert "boom-from-child" in exc.message
    else:  # it exec'd before we looked: then it must at least not count as alive
        assert wait_dead(proc)


def wait_dead(proc: ManagedProcess) -> bool:
    import time

    for _ in range(100):
        if not proc.alive():
            return True
        time.sleep(0.05)
    return False
