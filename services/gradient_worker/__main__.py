"""The gradient worker: ``python -m services.gradient_worker``.

Config from MAAS_* plus ``MAAS_WORKER_ID`` (this replica's id; a job with ``training.workers=W``
is trained by ids 0..W-1). SIGTERM/SIGINT: stop computing, close the data-plane streams and the
status consumer. A worker that leaves mid-job is removed from it by the shards once its streams
have been gone for MAAS_WORKER_HEARTBEAT_TIMEOUT_MS; one that restarts rejoins at the job's
current version.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping

from prometheus_client import start_http_server

from maas.config import Settings
from maas.errors import InvalidArgument
from maas.lifecycle import configure_logging, run_until_signalled, run_until_stopped
from services.gradient_worker.service import WorkerService

log = logging.getLogger("services.gradient_worker")


def worker_id_from_env(settings: Settings, environ: Mapping[str, str]) -> int:
    raw = environ.get("MAAS_WORKER_ID", "0")
    try:
        worker_id = int(raw)
    except ValueError:
        raise InvalidArgument(f"MAAS_WORKER_ID={raw!r} is not an integer") from None
    if not 0 <= worker_id < settings.gradient_workers:
        raise InvalidArgument(
            f"MAAS_WORKER_ID={worker_id} must be in 0..{settings.gradient_workers - 1} "
            f"(MAAS_GRADIENT_WORKERS={settings.gradient_workers})"
        )
    return worker_id


async def serve(settings: Settings, worker_id: int, stop: asyncio.Event) -> None:
    service = WorkerService(settings, worker_id)
    try:
        await service.start()
        if settings.metrics_port:
            start_http_server(
                settings.metrics_port, addr=settings.metrics_bind, registry=service.metrics.registry
            )
        log.info("%s waiting for training jobs", service.name)
        await run_until_stopped(service.run(), stop)
        log.info("shutting down")
    finally:
        await service.stop()
        log.info("stopped")


def main() -> None:
    settings = Settings.from_env()
    configure_logging(settings)
    worker_id = worker_id_from_env(settings, os.environ)
    run_until_signalled(lambda stop: serve(settings, worker_id, stop))


if __name__ == "__main__":
    main()
