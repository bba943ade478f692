"""The model registry for tests: as a process of its own, or served inside the test's process."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

from infra.compose import grpc_serving
from infra.proc import free_port
from infra.stack import PythonService
from maas.config import Settings
from maas.registry.client import RegistryClient
from maas.store import MODELS_BUCKET
from maas.store_async import AsyncObjectStore
from services.model_registry.service import RegistryLimits, RegistryService
from services.model_registry.servicer import build_server, set_serving
from services.model_registry.sqlite_store import SqliteStore


class RegistryProcess:
    """The registry server on a free port with a state dir (its SQLite file) of its own; ready
    once its gRPC health says SERVING. ``env``: more MAAS_* for the process."""

    def __init__(self, settings: Settings, workdir: Path, **env: str) -> None:
        port = free_port()
        self.settings = settings.replace(registry_addr=f"127.0.0.1:{port}")
        self.service = PythonService(
            "model-registry",
            "services.model_registry",
            "127.0.0.1",
            port,
            workdir,
            {
                "MAAS_REGISTRY_LISTEN": f"127.0.0.1:{port}",
                "MAAS_STATE_DIR": str(workdir / "state"),
                **env,
            },
            health=partial(grpc_serving, "127.0.0.1", port, settings=settings),
        )

    @property
    def pid(self) -> int | None:
        return self.service.process.pid()

    def start(self, *, timeout_s: float = 90.0) -> None:
        self.service.start(timeout_s=timeout_s)

    def stop(self) -> bool:
        return self.service.stop()

    def kill(self) -> None:
        """SIGKILL, then reap it and remove its PID file."""
        pid = self.pid
        assert pid is not None, "the registry is not running"
        os.kill(pid, signal.SIGKILL)
        self.service.stop()

    def serving(self) -> bool:
        return self.service.ready()


@contextlib.asynccontextmanager
async def registry_in_process(
    settings: Settings,
    state_dir: Path,
    *,
    part_size_bytes: int,
    limits: RegistryLimits | None = None,
) -> AsyncIterator[tuple[RegistryService, RegistryClient]]:
    """A registry service and its gRPC server in this process (SQLite in ``state_dir``, objects
    in the stack's S3), and a client of it."""
    store = AsyncObjectStore(settings)
    await store.start()
    service = RegistryService(
        SqliteStore(state_dir / "registry.db"),
        store,
        bucket=MODELS_BUCKET,
        part_size_bytes=part_size_bytes,
        limits=limits or RegistryLimits(),
    )
    server, health = build_server(service, settings)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await set_serving(health, True)
    try:
        async with RegistryClient(settings, addr=f"127.0.0.1:{port}") as client:
            yield service, client
    finally:
        await server.stop(None)
        await store.stop()
        service.close()
