"""The compressor: ``python -m services.compressor``.

Config from MAAS_* (Kafka, S3, registry address). SIGTERM/SIGINT: stop consuming (the job in
progress is not committed, so it is redelivered and resumes), then close the registry client
and the producer.
"""

from __future__ import annotations

import asyncio
import logging

import torch

from maas.config import Settings
from maas.lifecycle import configure_logging, run_until_signalled, run_until_stopped
from services.compressor.service import CompressorService

log = logging.getLogger("services.compressor")


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    torch.set_num_threads(settings.compressor_torch_threads)
    service = CompressorService(settings)
    try:
        await service.start()
        log.info("compressor consuming compress jobs (registry %s)", settings.registry_addr)
        # Cancelling mid-job leaves its record uncommitted: it is redelivered and resumes.
        await run_until_stopped(service.run(), stop)
        log.info("shutting down")
    finally:
        await service.stop()
        log.info("stopped")


def main() -> None:
    settings = Settings.from_env()
    configure_logging(settings)
    run_until_signalled(lambda stop: serve(settings, stop))


if __name__ == "__main__":
    main()
