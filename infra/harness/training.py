"""The training processes as children on free ports (integration tests and bench/train.py): the
coordinator, aggregator shards and gradient workers, each a real ``python -m services.<name>``,
ready once its /metrics port answers, stopped (or killed) by its PID.

The Kafka/S3 settings come from the environment (the ``stack`` fixture and ``infra.ephemeral``
export them); ``registry_addr`` is where the coordinator registers results.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

from infra.proc import free_port
from infra.stack import PythonService, auth_env, stop_together
from maas.config import Settings


def start_all(services: list[PythonService], timeout_s: float = 180.0) -> None:
    """Start every one, then wait for each: they import torch in parallel."""
    for service in services:
        service.start(wait=False)
    deadline = time.monotonic() + 10
    # Until exec, a child's cmdline lacks the marker alive() looks for.
    while not all(s.process.alive() for s in services) and time.monotonic() < deadline:
        time.sleep(0.02)
    for service in services:
        service.wait_ready(timeout_s=timeout_s)


class TrainingProcesses(contextlib.AbstractContextManager["TrainingProcesses"]):
    def __init__(
        self, workdir: Path, registry_addr: str, *, workers: int, shards: int, **env: str
    ) -> None:
        self.workdir = workdir
        settings = Settings.from_env()
        self.env = {
            "MAAS_REGISTRY_ADDR": registry_addr,
            # The stack's services token, as `maas stack up` gives them: the training data
            # plane takes no operator's token.
            **(auth_env(settings, {}) if settings.auth else {}),
            **env,
        }
        self.coordinator = self._service(
            "training-coordinator", "services.aggregator", MAAS_AGGREGATOR_ROLE="coordinator"
        )
        self.shards = [self._shard(s) for s in range(shards)]
        self.workers = [self._worker(w) for w in range(workers)]

    def spawn(self, name: str, module: str, **env: str) -> PythonService:
        """Start one more process of ``module`` without waiting for it (it may exit at once)."""
        service = self._service(name, module, **env)
        service.start(wait=False)
        return service

    def _shard(self, index: int) -> PythonService:
        return self._service(f"aggregator-{index}", "services.aggregator")

    def _worker(self, index: int) -> PythonService:
        return self._service(f"gradient-worker-{index}", "services.gradient_worker")

    def _service(self, name: str, module: str, **env: str) -> PythonService:
        port = free_port()
        # The process name is its pool member id: tests find who holds a rank by it.
        full = {**self.env, "MAAS_MEMBER_ID": name, **env, "MAAS_METRICS_PORT": str(port)}
        return PythonService(name, module, "127.0.0.1", port, self.workdir, full)

    @property
    def everything(self) -> list[PythonService]:
        return [self.coordinator, *self.shards, *self.workers]

    def start(self, workers: int | None = None) -> None:
        """Start the coordinator, every shard and the first ``workers`` workers (default all)."""
        start_all([self.coordinator, *self.shards, *self.workers[:workers]])

    def use_workers(self, count: int) -> None:
        """Exactly ``count`` workers running (a free one would be given a job's vacant rank)."""
        stop_together(self.workers[count:])
        start_all([w for w in self.workers[:count] if not w.process.alive()])

    def add_worker(self) -> PythonService:
        """Start one more worker: it joins the pool like any other."""
        worker = self._worker(len(self.workers))
        self.workers.append(worker)
        start_all([worker])
        return worker

    @staticmethod
    def kill(service: PythonService) -> None:
        """SIGKILL: no graceful shutdown, as in a crash."""
        pid = service.process.pid()
        if pid is None:
            raise RuntimeError(f"{service.name} is not running")
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while service.process.alive() and time.monotonic() < deadline:
            time.sleep(0.05)  # a zombie already counts as dead

    def stop(self) -> None:
        stop_together(self.everything)  # each drains on its own: one at a time took ~20 s

    def __exit__(self, *exc: object) -> None:
        self.stop()
