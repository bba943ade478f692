"""`maas stack status` on replicas: each one listed with its own ports, the ports `up` chose kept
for later calls, and a replica that stopped on its own named with how it ended: its exit status
or the signal that killed it, and the fatal line of its last moments, never an old one; one
running but not ready named with what its health check says."""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from infra.compose import ServiceSpec, dependency_reason, health_reason
from infra.exits import LAST_LINES, why_down
from infra.proc import RUN_EXITED, RUN_STARTED, RUN_STOPPED, ManagedProcess, run_marker
from infra.stack import ComponentStatus, LocalStack, start_plan
from maas.cli import _print_status, main
from maas.config import Settings
from maas.errors import FailedPrecondition, Unavailable
from maas.lifecycle import LOG_FORMAT
from maas.liveness import Liveness, serve_metrics
from maas.readiness import FAILURES_TO_DOWN
from maas.training.control import Identity, member_event


def local(state_dir: Path, **scale: int) -> LocalStack:
    settings = Settings.from_env({}).replace(state_dir=str(state_dir))
    return LocalStack.from_settings(settings, with_services=True, scale=scale)


def test_two_inference_replicas_listen_on_distinct_ports(tmp_path: Path) -> None:
    rows = {row.name: row for row in local(tmp_path, inference=2).status()}
    first, second = rows["inference"].ports, rows["inference-1"].ports
    assert set(first) == set(second) >= {"MAAS_INFERENCE_LISTEN", "MAAS_INFERENCE_HTTP_LISTEN"}
    assert set(first.values()).isdisjoint(second.values())


def test_status_reports_the_ports_up_chose(tmp_path: Path) -> None:
    chosen = {row.name: row.ports for row in local(tmp_path, inference=2).status()}
    again = {row.name: row.ports for row in local(tmp_path).status()}  # scale remembered too
    assert again == chosen
    assert "inference-1" in again


def test_down_forgets_the_chosen_ports(tmp_path: Path) -> None:
    stack = local(tmp_path, inference=2)
    stack.down()
    assert not (stack.stack_dir / "ports.json").exists()
    assert "inference-1" not in {row.name for row in local(tmp_path).status()}


def refused_log(path: Path) -> str:
    """What a second process under a held member id writes, through the services' log format."""
    holder = Identity("w-1", "worker", incarnation="aaa", since=1000)
    twin = Identity("w-1", "worker", incarnation="bbb", since=2000)
    reason = twin.fenced_by(member_event(holder, "up"))
    assert reason
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logger = logging.getLogger("maas.training.control.test")
    logger.addHandler(handler)
    try:
        logger.info("gradient-worker-w-1 waiting for training jobs")
        logger.error("%s", reason)
    finally:
        logger.removeHandler(handler)
        handler.close()
    with path.open("a") as log:
        log.write("Traceback (most recent call last):\n  ...\nIdentityTaken: " + reason + "\n")
    return reason


def test_the_reason_is_the_exception_that_ended_the_run(tmp_path: Path) -> None:
    reason = refused_log(tmp_path / "x.log")
    assert why_down(tmp_path / "x.log") == f"IdentityTaken: {reason}"
    assert why_down(tmp_path / "missing.log") == ""


def test_errors_of_an_earlier_run_or_before_a_requested_stop_are_no_reason(
    tmp_path: Path,
) -> None:
    log = tmp_path / "x.log"
    refused_log(log)
    with log.open("ab") as out:
        out.write(run_marker(RUN_STARTED, "x") + b"... INFO all is well\n")
    assert why_down(log) == ""  # the error belongs to the run before
    refused_log(log)
    with log.open("ab") as out:
        out.write(run_marker(RUN_STOPPED, "x") + exited(143))  # sh may write after `stop`
    assert why_down(log) == ""  # it was stopped, it did not fail


def test_status_names_a_replica_refused_for_a_held_member_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    stack = local(tmp_path)
    stack.stack_dir.mkdir(parents=True, exist_ok=True)
    reason = refused_log(stack.stack_dir / "gradient-worker-1.log")
    rows = {row.name: row for row in stack.status()}
    assert rows["gradient-worker-1"].why_down == f"IdentityTaken: {reason}"
    assert rows["gradient-worker"].why_down == ""

    monkeypatch.setenv("MAAS_STATE_DIR", str(tmp_path))
    assert main(["stack", "status"]) == 3
    out = capsys.readouterr().out
    assert "gradient-worker-1 is down: IdentityTaken: member id 'w-1' is held by another" in out


def exited(status: int) -> bytes:
    """The line the exit recorder (infra.proc) writes when the process ends."""
    return f"\n--- 2026-12-05 21:13:21 {RUN_EXITED} {status} x\n".encode()


# What the registry's log held when `maas stack status` blamed a Kafka outage for its SIGKILL.
KAFKA_OUTAGE = """\
2026-12-05 21:00:29,976 ERROR aiokafka: Unable connect to node with id 1: [Errno 111] refused
2026-12-05 21:00:29,976 ERROR aiokafka: Unable to update metadata from [1]
2026-12-05 21:00:30,095 WARNING aiokafka.producer.sender: Got error produce response, retrying
"""
LATER = "2026-12-05 21:06:47,856 INFO services.model_registry.service: registered p7-long@11\n"


def run_log(path: Path, output: str, *tail: bytes) -> Path:
    path.write_bytes(run_marker(RUN_STARTED, "x") + output.encode() + b"".join(tail))
    return path


def test_a_process_killed_by_a_signal_is_said_to_be(tmp_path: Path) -> None:
    marker = str(tmp_path / "marker")
    proc = ManagedProcess("sleeper", tmp_path / "s.pid", tmp_path / "s.log", marker=marker)
    pid = proc.start([sys.executable, "-c", "import time; time.sleep(60)", marker], cwd=tmp_path)
    try:
        os.kill(pid, signal.SIGKILL)
        for _ in range(200):  # until the exit recorder has written its line
            if RUN_EXITED in proc.log_file.read_text():
                break
            time.sleep(0.05)
        assert why_down(proc.log_file) == "killed by SIGKILL"
    finally:
        proc.stop(timeout_s=5)


def test_an_old_kafka_outage_is_not_why_a_killed_process_is_down(tmp_path: Path) -> None:
    log = run_log(tmp_path / "x.log", KAFKA_OUTAGE + LATER, exited(137))
    assert why_down(log) == "killed by SIGKILL"


def test_a_late_error_line_is_not_why_a_process_was_killed_by_a_signal(tmp_path: Path) -> None:
    # The coordinator's refusal of a user's job, a second before an operator's SIGKILL, was
    # given as why it was killed.
    refusal = "2026-12-05 21:06:47,000 ERROR maas.bus_consumer: dead-lettering jobs[2]@34: bad\n"
    assert why_down(run_log(tmp_path / "x.log", refusal, exited(137))) == "killed by SIGKILL"
    assert why_down(run_log(tmp_path / "y.log", refusal, exited(143))) == "killed by SIGTERM"


def test_a_kafka_clients_lines_are_never_the_reason(tmp_path: Path) -> None:
    assert why_down(run_log(tmp_path / "x.log", KAFKA_OUTAGE)) == ""


def test_an_error_line_is_the_reason_only_from_the_last_moments(tmp_path: Path) -> None:
    error = "2026-12-05 21:06:40,000 ERROR maas.bus: S3 unreachable\n"
    assert why_down(run_log(tmp_path / "x.log", error + LATER, exited(1))) == (
        "exited with status 1"  # 7 s before its last line: it lived on after it
    )
    late = error.replace("21:06:40", "21:06:45")
    assert why_down(run_log(tmp_path / "x.log", late + LATER, exited(1))) == (
        "exited with status 1: S3 unreachable"
    )


def test_a_traceback_is_the_reason_only_among_the_last_lines(tmp_path: Path) -> None:
    crash = "Traceback (most recent call last):\n  File 'x.py'\n    f()\nValueError: bad\n"
    assert why_down(run_log(tmp_path / "x.log", crash, exited(1))) == (
        "exited with status 1: ValueError: bad"
    )
    lived_on = crash + LATER * LAST_LINES
    assert why_down(run_log(tmp_path / "x.log", lived_on, exited(1))) == "exited with status 1"


def test_a_service_starts_once_what_it_depends_on_is_ready(tmp_path: Path) -> None:
    services = local(tmp_path).services
    steps = [
        ([s.name for s in start], [s.name for s in wait]) for start, wait in start_plan(services)
    ]
    (first_start, first_wait), (second_start, second_wait) = steps
    # Everything that needs no other service starts at once; only the registry is waited for
    # before the services that need it start; then the stack waits for all the rest.
    assert {"model-registry", "aggregator-1", "gradient-worker-1"} <= set(first_start)
    assert first_wait == ["model-registry"]
    assert {"inference", "compressor", "training-coordinator"} <= set(second_start)
    assert sorted(first_start + second_start) == sorted(s.name for s in services)
    assert sorted(first_wait + second_wait) == sorted(s.name for s in services)


def test_a_dependency_scaled_to_zero_does_not_hold_its_dependents(tmp_path: Path) -> None:
    services = local(tmp_path, **{"model-registry": 0}).services
    ((start, wait),) = start_plan(services)
    assert sorted(s.name for s in start) == sorted(s.name for s in wait)
    assert "inference" in {s.name for s in start}


def started_with_tls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> LocalStack:
    """A stack whose services run (as far as their PIDs say) and were started with TLS on;
    this environment has it off."""
    stack = local(tmp_path)
    stack.stack_dir.mkdir(parents=True, exist_ok=True)
    (stack.stack_dir / "tls.json").write_text('{"grpc_tls": true}')
    monkeypatch.setattr(type(stack.services[0].process), "pid", lambda self: 4242)
    return stack


def test_a_shell_without_tls_is_told_the_running_services_speak_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mismatch = started_with_tls(tmp_path, monkeypatch).tls_mismatch()
    assert mismatch is not None and "MAAS_GRPC_TLS=true and MAAS_TLS_CA_FILE" in mismatch


def test_up_from_such_a_shell_refuses_at_once_instead_of_waiting_for_readiness(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(FailedPrecondition, match="speak TLS.*or `maas stack down` first"):
        started_with_tls(tmp_path, monkeypatch).up()


def test_no_tls_hint_once_the_services_are_gone(tmp_path: Path) -> None:
    stack = local(tmp_path)
    stack.stack_dir.mkdir(parents=True, exist_ok=True)
    (stack.stack_dir / "tls.json").write_text('{"grpc_tls": true}')
    assert stack.tls_mismatch() is None


@pytest.fixture
def worker_health() -> Iterator[tuple[ServiceSpec, Liveness]]:
    """A worker's /healthz, served as the worker serves it, and the spec that checks it."""
    liveness = Liveness(CollectorRegistry())
    server = serve_metrics(0, "127.0.0.1", CollectorRegistry(), liveness)
    spec = ServiceSpec(
        "gradient-worker", "gradient-worker", "services.gradient_worker", 0, {}, (), "http",
        "127.0.0.1", server.server_port,
    )  # fmt: skip
    try:
        yield spec, liveness
    finally:
        server.shutdown()


def test_a_service_that_does_not_answer_its_health_check_is_said_to_be_hung() -> None:
    with socket.socket() as listener:  # accepts connections, answers nothing: a frozen process
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        spec = ServiceSpec(
            "gradient-worker", "gradient-worker", "services.gradient_worker", 0, {}, (), "http",
            "127.0.0.1", listener.getsockname()[1],
        )  # fmt: skip
        assert "did not answer within 0.2 s: the process is hung or stopped" in health_reason(
            spec, timeout_s=0.2
        )


def test_a_service_not_ready_says_why_in_its_status(worker_health) -> None:
    spec, liveness = worker_health
    assert health_reason(spec) == ""  # serving
    liveness.set_condition("training pool", "out of the training pool for 60 s: refused")
    assert (
        health_reason(spec)
        == "NOT_SERVING: training pool: out of the training pool for 60 s: refused"
    )


async def test_a_serving_service_cut_off_from_kafka_says_so_in_its_status(worker_health) -> None:
    spec, liveness = worker_health
    assert dependency_reason(spec) == ""  # ready

    async def refused() -> None:
        raise Unavailable("Kafka at 127.0.0.1:9092: connection refused")

    liveness.dependencies.add("kafka", refused)
    for _ in range(FAILURES_TO_DOWN):
        await liveness.dependencies.check_all()
    assert health_reason(spec) == ""  # still serving: an outage elsewhere is no reason to restart
    assert dependency_reason(spec).startswith(
        "NOT_READY: kafka: Kafka at 127.0.0.1:9092: connection refused (for "
    )


def test_status_prints_a_degraded_component_and_why(capsys) -> None:
    row = ComponentStatus(
        "compressor", 42, True, "127.0.0.1", 9102, healthy=True,
        why_degraded="NOT_READY: s3: S3 at 127.0.0.1:9000: connection refused (for 12 s)",
    )  # fmt: skip
    _print_status([row])
    out = capsys.readouterr().out
    assert "degraded" in out.splitlines()[1]
    assert "compressor is degraded: NOT_READY: s3: S3 at 127.0.0.1:9000" in out


def test_status_prints_why_a_running_component_is_not_ready(capsys) -> None:
    row = ComponentStatus(
        "gradient-worker", 42, True, "127.0.0.1", 9000, healthy=False,
        why_not_ready="NOT_SERVING: training pool: refused",
    )  # fmt: skip
    _print_status([row])
    out = capsys.readouterr().out
    assert "gradient-worker is not ready: NOT_SERVING: training pool: refused" in out
