"""The gradient worker: ``python -m services.gradient_worker``.

Config from MAAS_* plus ``MAAS_WORKER_ID`` (this replica's id; a job with ``training.workers=W``
is trained by ids 0..W-1). SIGTERM/SIGINT: stop receiving and computing, close the consumer and
the producer. A worker that leaves mid-job costs the job nothing but its gradients: shards close
steps by quorum or deadline without it, and a restarted worker rejoins at the next version.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Mapping

from prometheus_client import start_http_server

from maas.config import Settings
from maas.errors import InvalidArgument
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
    running: asyncio.Task[None] | None = None
    try:
        await service.start()
        if settings.metrics_port:
            start_http_server(settings.metrics_port, registry=service.metrics.registry)
        running = asyncio.create_task(service.run(), name=service.name)
        log.info("%s waiting for jobs on maas.params.v1", service.name)
        stopping = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait([running, stopping], return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if running in done:
            running.result()  # it only ends on its own by crashing: exit with its error
        log.info("shutting down")
    finally:
        if running is not None:
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
        await service.stop()
        log.info("stopped")


def main() -> None:
    settings = Settings.from_env()
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    worker_id = worker_id_from_env(settings, os.environ)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(settings, worker_id, stop)

    asyncio.run(run())


if __name__ == "__main__":
    main()
