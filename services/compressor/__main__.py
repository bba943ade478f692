"""The compressor: ``python -m services.compressor``.

Config from MAAS_* (Kafka, S3, registry address). SIGTERM/SIGINT: stop consuming (the job in
progress is not committed, so it is redelivered and resumes), then close the registry client
and the producer.
"""

from __future__ import annotations

import asyncio
import logging
import signal

import torch

from maas.config import Settings
from services.compressor.service import CompressorService

log = logging.getLogger("services.compressor")


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    torch.set_num_threads(settings.compressor_torch_threads)
    service = CompressorService(settings)
    consuming: asyncio.Task[None] | None = None
    try:
        await service.start()
        consuming = asyncio.create_task(service.run(), name="compress-jobs")
        log.info("compressor consuming compress jobs (registry %s)", settings.registry_addr)
        stopping = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait([consuming, stopping], return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if consuming in done:
            consuming.result()  # the loop only ends on its own by crashing: exit with its error
        log.info("shutting down")
    finally:
        if consuming is not None:
            # Cancelling mid-job leaves its record uncommitted: it is redelivered and resumes.
            consuming.cancel()
            await asyncio.gather(consuming, return_exceptions=True)
        await service.stop()
        log.info("stopped")


def main() -> None:
    settings = Settings.from_env()
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(settings, stop)

    asyncio.run(run())


if __name__ == "__main__":
    main()
