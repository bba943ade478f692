"""The inference server: ``python -m services.inference``.

Config from MAAS_* (inference_listen, registry_addr, S3, Kafka, batching, token, metrics port).
SIGTERM/SIGINT: report not-ready, stop accepting, let in-flight calls finish (grace period),
then stop consuming registry events and close the registry client.
"""

from __future__ import annotations

import asyncio
import logging

from maas.config import Settings
from maas.lifecycle import configure_logging, run_until_signalled
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
    configure_logging(settings)
    run_until_signalled(lambda stop: serve(settings, stop))


if __name__ == "__main__":
    main()
