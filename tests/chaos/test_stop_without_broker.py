"""Services stopped while the Kafka broker is away exit cleanly, status 0, within the stop grace
of the harness that stopped them (SIGKILL after 20 s; compose gives 30 s). Each farewell to Kafka
is given up after KAFKA_STOP_S: a member's ``down``, a shard's last statuses, a producer's
pending events, a consumer leaving its group. Before that bound, a gradient worker took 60 s and
died of aiokafka's CancelledError on the way out, and a shard was still waiting after 120 s."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from infra.exits import exit_of, latest_run
from infra.harness.serving import ServiceProcesses
from infra.harness.training import TrainingProcesses
from infra.stack import PythonService, stop_together

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

CLEAN = "exited with status 0"


def how_it_ended(service: PythonService) -> str:
    """The exit recorder's account of the service's last run (it writes just after the exit)."""
    log_file: Path = service.process.log_file
    deadline = time.monotonic() + 10
    while True:
        how = exit_of(latest_run(log_file.read_text(errors="replace").splitlines()))
        if how or time.monotonic() > deadline:
            return how
        time.sleep(0.1)


def test_every_service_stopped_while_the_broker_is_away_exits_cleanly(stack, tmp_path) -> None:
    kafka = stack.local.kafka
    with ServiceProcesses(tmp_path) as processes:
        registry = processes.start_registry()
        processes.start_inference("inference", registry)
        with TrainingProcesses(tmp_path, registry, workers=1, shards=1) as training:
            training.start()
            services = [*training.everything, *processes.started.values()]
            kafka.stop()
            try:
                stop_together(services)
            finally:
                kafka.start()
    endings = {service.name: how_it_ended(service) for service in services}
    assert endings == {service.name: CLEAN for service in services}
