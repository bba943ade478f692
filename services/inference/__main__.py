"""The inference server: ``python -m services.inference``.

Config from MAAS_* (inference_listen, registry_addr, S3, Kafka, batching, token, metrics port).
SIGTERM/SIGINT: report not-ready, stop accepting, let in-flight calls finish (grace period),
then stop consuming registry events and close the registry client.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from maas.config import Settings
from maas.registry import RegistryClient
from services.inference.server import InferenceServer
from services.inference.sources import RegistrySource

log = logging.getLogger("services.inference")
SHUTDOWN_GRACE_S = 10.0


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    async with RegistryClient(settings, actor="maas-inference") as registry:
        server = InferenceServer(settings, RegistrySource(registry))
        try:
            await server.start()
            await stop.wait()
            log.info("shutting down")
        finally:
            await server.stop(SHUTDOWN_GRACE_S)
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
