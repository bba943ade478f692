"""The registry and inference servers as child processes on free ports (integration tests and
bench/serve.py): each is a real ``python -m services.<name>`` started with its own MAAS_*
environment, waited for until it reports SERVING, and stopped by its PID.

The Kafka/S3 settings come from the environment (the ``stack`` fixture and ``infra.ephemeral``
export them).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from infra.proc import free_port
from infra.stack import PythonService
from maas.errors import DeadlineExceeded
from services.inference.server import OIP_SERVICE


def serving(addr: str, service: str = "", *, timeout_s: float = 1.0) -> bool:
    """True once the gRPC health service at ``addr`` reports ``service`` SERVING."""
    with grpc.insecure_channel(addr) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


class ServiceProcesses(contextlib.AbstractContextManager["ServiceProcesses"]):
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: dict[str, PythonService] = {}

    def _start(
        self,
        name: str,
        module: str,
        env: Mapping[str, str],
        port: int,
        ready_service: str,
        timeout_s: float,
    ) -> str:
        service = PythonService(name, module, "127.0.0.1", port, self.workdir, dict(env))
        self.started[name] = service
        service.start(wait=False)
        deadline = time.monotonic() + timeout_s
        addr = f"127.0.0.1:{port}"
        while not serving(addr, ready_service):
            if time.monotonic() > deadline or not service.process.alive():
                raise DeadlineExceeded(
                    f"{name} did not report SERVING in {timeout_s:.0f}s; log "
                    f"{service.process.log_file}:\n{service.process.log_tail()}"
                )
            time.sleep(0.2)
        return addr

    def start_registry(self, *, timeout_s: float = 120.0) -> str:
        port = free_port()
        env = {
            "MAAS_REGISTRY_LISTEN": f"127.0.0.1:{port}",
            # Its own SQLite file: other registries of the same stack must not share it.
            "MAAS_STATE_DIR": str(self.workdir / "registry-state"),
        }
        return self._start("registry", "services.model_registry", env, port, "", timeout_s)

    def start_inference(
        self, name: str, registry_addr: str, *, timeout_s: float = 120.0, **env: str
    ) -> str:
        """An inference server; ``env`` adds MAAS_* overrides (batching, token, limits)."""
        port = free_port()
        full = {
            "MAAS_INFERENCE_LISTEN": f"127.0.0.1:{port}",
            "MAAS_REGISTRY_ADDR": registry_addr,
            "MAAS_INFERENCE_METRICS_PORT": str(free_port()),
            **env,
        }
        return self._start(name, "services.inference", full, port, OIP_SERVICE, timeout_s)

    def metrics_port(self, name: str) -> int:
        return int(self.started[name].env["MAAS_INFERENCE_METRICS_PORT"])

    def log_tail(self, name: str, lines: int = 40) -> str:
        return self.started[name].process.log_tail(lines)

    def stop(self) -> None:
        for service in reversed(list(self.started.values())):
            service.stop()

    def __exit__(self, *exc: object) -> None:
        self.stop()
