"""The registry process as ``maas.lifecycle`` runs it: the SQLite store, S3, the gRPC server and
the outbox relay that publishes committed events to Kafka.

Metadata lives in ``$MAAS_STATE_DIR/registry/registry.db``. Stopping reports NOT_SERVING, stops
accepting, lets running calls finish (``SHUTDOWN_GRACE_S``), stops the relay, then closes S3,
Kafka and SQLite. A relay that died leaves the health NOT_SERVING, saying why.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from prometheus_client import CollectorRegistry

from maas.bus import EventProducer
from maas.config import Settings
from maas.edge import add_port
from maas.liveness import Liveness
from maas.readiness import s3_check
from maas.store import MODELS_BUCKET
from maas.store_async import AsyncObjectStore
from services.model_registry.outbox import OutboxRelay
from services.model_registry.service import RegistryLimits, RegistryService
from services.model_registry.servicer import build_server, set_serving
from services.model_registry.sqlite_store import SqliteStore

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 10.0
RELAY_STOP_S = 5.0


def db_path(settings: Settings) -> Path:
    return settings.state_path / "registry" / "registry.db"


class RegistryProcess:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._store = AsyncObjectStore(settings, threads=8)
        self._producer = EventProducer(settings, client_id="model-registry")
        self._metadata = SqliteStore(db_path(settings))
        self._relay = OutboxRelay(self._metadata, self._producer)
        self.service = RegistryService(
            self._metadata,
            self._store,
            bucket=MODELS_BUCKET,
            part_size_bytes=settings.s3_part_size_bytes,
            on_commit=self._relay.wake,
            limits=RegistryLimits.of(settings),
        )
        self._server, self._health = build_server(self.service, settings)
        self.metrics_registry = CollectorRegistry()
        # A relay that died would leave events unpublished: the health says so and why.
        self.liveness = Liveness(self.metrics_registry, on_change=self._not_serving)
        self.liveness.dependencies.add("kafka", self._relay.check_kafka)
        self.liveness.dependencies.add("s3", s3_check(settings))
        self._relay_task: asyncio.Task[None] | None = None

    async def _not_serving(self, _why: str | None) -> None:
        await set_serving(self._health, False)

    async def start(self) -> None:
        settings = self._settings
        port = add_port(self._server, settings.registry_listen, settings, "MAAS_REGISTRY_LISTEN")
        await self._store.start()
        await self.service.sweep_incomplete_uploads()
        await self._server.start()
        await set_serving(self._health, True)
        self._relay_task = asyncio.create_task(
            self.liveness.supervise("outbox-relay", self._relay.run()), name="outbox-relay"
        )
        log.info(
            "model registry listening on %s (port %d), db %s, schema v%d",
            settings.registry_listen,
            port,
            self._metadata.path,
            self._metadata.schema_version(),
        )

    async def run(self) -> None:
        # Calls are served by the gRPC server; the relay runs supervised beside it, and is
        # stopped only after the calls in flight committed (their events go out first).
        await asyncio.Event().wait()

    async def stop(self) -> None:
        await set_serving(self._health, False)
        await self._server.stop(SHUTDOWN_GRACE_S)
        await self._relay.stop()
        if self._relay_task is not None:
            # A send stuck on an absent broker is abandoned: unmarked events go out next start.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(RELAY_STOP_S):
                    await self._relay_task
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(RELAY_STOP_S):
                await self._producer.stop()
        await self._store.stop()
        self.service.close()
