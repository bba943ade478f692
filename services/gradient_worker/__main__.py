"""The gradient worker: ``python -m services.gradient_worker``.

Config from MAAS_* only: a worker has no fixed id (run as many as you like; each joins the
training pool on its own and the coordinator assigns it to jobs). SIGTERM/SIGINT: say ``down``,
stop computing, close the data-plane streams. A worker that leaves mid-job loses its rank once its
heartbeats stop (MAAS_WORKER_HEARTBEAT_TIMEOUT_MS); the rank goes to a free worker, which joins
at the job's current version.
"""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import start_http_server

from maas.config import Settings
from maas.lifecycle import (
    configure_logging,
    limit_compute_threads,
    run_until_signalled,
    run_until_stopped,
)
from services.gradient_worker.service import WorkerService

log = logging.getLogger("services.gradient_worker")


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    service = WorkerService(settings)
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
    limit_compute_threads(settings.training_compute_threads)
    run_until_signalled(lambda stop: serve(settings, stop))


if __name__ == "__main__":
    main()
