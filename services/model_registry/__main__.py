"""The model registry server: ``python -m services.model_registry``.

Config from MAAS_* (registry_listen, S3, Kafka, state_dir, auth, TLS); metadata in
``$MAAS_STATE_DIR/registry/registry.db``. SIGTERM/SIGINT: stop accepting, let running calls
finish (grace period), stop the outbox relay, then close S3, Kafka and SQLite.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from maas.bus import EventProducer
from maas.config import Settings
from maas.edge import add_port
from maas.lifecycle import configure_logging, run_until_signalled
from maas.liveness import Liveness
from maas.store import MODELS_BUCKET, AsyncObjectStore
from services.model_registry.outbox import OutboxRelay
from services.model_registry.service import RegistryLimits, RegistryService
from services.model_registry.servicer import build_server, set_serving
from services.model_registry.sqlite_store import SqliteStore

log = logging.getLogger("services.model_registry")
SHUTDOWN_GRACE_S = 10.0
RELAY_STOP_S = 5.0


def db_path(settings: Settings) -> Path:
    return settings.state_path / "registry" / "registry.db"


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    store = AsyncObjectStore(settings, threads=8)
    producer = EventProducer(settings, client_id="model-registry")
    metadata = SqliteStore(db_path(settings))
    relay = OutboxRelay(metadata, producer)
    service = RegistryService(
        metadata,
        store,
        bucket=MODELS_BUCKET,
        part_size_bytes=settings.s3_part_size_bytes,
        on_commit=relay.wake,
        limits=RegistryLimits.of(settings),
    )
    server, health = build_server(service, settings)
    port = add_port(server, settings.registry_listen, settings, "MAAS_REGISTRY_LISTEN")
    relay_task: asyncio.Task[None] | None = None
    try:
        await store.start()
        await service.sweep_incomplete_uploads()
        await server.start()
        await set_serving(health, True)
        # A relay that died would leave events unpublished: the health says so and why.
        liveness = Liveness(on_change=lambda _why: set_serving(health, False))
        relay_task = asyncio.create_task(
            liveness.supervise("outbox-relay", relay.run()), name="outbox-relay"
        )
        log.info(
            "model registry listening on %s (port %d), db %s, schema v%d",
            settings.registry_listen,
            port,
            metadata.path,
            metadata.schema_version(),
        )
        await stop.wait()
        log.info("shutting down")
    finally:
        await set_serving(health, False)
        await server.stop(SHUTDOWN_GRACE_S)
        await relay.stop()
        if relay_task is not None:
            # A send stuck on an absent broker is abandoned: unmarked events go out next start.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(relay_task, RELAY_STOP_S)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(producer.stop(), RELAY_STOP_S)
        await store.stop()
        service.close()
        log.info("stopped")


def main() -> None:
    settings = Settings.from_env()
    configure_logging(settings)
    run_until_signalled(lambda stop: serve(settings, stop))


if __name__ == "__main__":
    main()
