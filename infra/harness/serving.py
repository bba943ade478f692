"""The registry and inference servers as child processes on free ports (integration tests and
bench/serve.py): each is a real ``python -m services.<name>`` started with its own MAAS_*
environment, waited for until it reports SERVING, and stopped by its PID.

The Kafka/S3 settings come from the environment (the ``stack`` fixture and ``infra.ephemeral``
export them).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from infra.proc import free_port
from infra.stack import PythonService, stop_together
from maas.errors import DeadlineExceeded
from services.inference.server import OIP_SERVICE

# KServe as a peer runs from a venv of its own: its generated protos clash with tritonclient's
# in one process (kserve/kserve#3099). The venv is keyed on the pinned version.
KSERVE_VERSION = "0.21.0"


def kserve_venv() -> Path:
    cache = Path(os.environ.get("MAAS_CACHE_DIR") or Path.home() / ".cache" / "maas")
    return cache / f"venv-kserve-{KSERVE_VERSION}"


def kserve_python(*, build: bool = True, timeout_s: float = 1800.0) -> Path:
    """The KServe venv's interpreter, built on first use (python -m venv + pip install kserve).

    Concurrent callers wait on a lock file; a failed build raises with pip's output tail, so a
    caller reports the peer as not run instead of dropping it silently.
    """
    venv = kserve_venv()
    python = venv / "bin" / "python"
    ready = venv / ".ready"
    if ready.exists() or not build:
        return python
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{venv}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not ready.exists():
            _build_venv(venv, [f"kserve=={KSERVE_VERSION}"], timeout_s)
            ready.write_text(KSERVE_VERSION)
    return python


def _build_venv(venv: Path, packages: list[str], timeout_s: float) -> None:
    steps = [
        [sys.executable, "-m", "venv", "--clear", str(venv)],
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *packages],
    ]
    deadline = time.monotonic() + timeout_s
    for step in steps:
        done = subprocess.run(
            step, capture_output=True, text=True, timeout=max(deadline - time.monotonic(), 1)
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(step[:4])} failed: {(done.stdout + done.stderr)[-2000:]}"
            )


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
            "MAAS_INFERENCE_HTTP_LISTEN": f"127.0.0.1:{free_port()}",
            **env,
        }
        return self._start(name, "services.inference", full, port, OIP_SERVICE, timeout_s)

    def metrics_port(self, name: str) -> int:
        return int(self.started[name].env["MAAS_INFERENCE_METRICS_PORT"])

    def pid(self, name: str) -> int:
        pid = self.started[name].process.pid()
        if pid is None:
            raise DeadlineExceeded(f"{name} is not running; log:\n{self.log_tail(name)}")
        return pid

    def http_addr(self, name: str) -> str:
        """host:port of a started inference server's HTTP API (OIP REST, OpenAI)."""
        return self.started[name].env["MAAS_INFERENCE_HTTP_LISTEN"]

    def log_tail(self, name: str, lines: int = 40) -> str:
        return self.started[name].process.log_tail(lines)

    def stop(self) -> None:
        stop_together(list(self.started.values()))

    def __exit__(self, *exc: object) -> None:
        self.stop()
