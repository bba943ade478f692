"""The inference process as ``maas.lifecycle`` runs it: a registry client, and the inference
server answering from the versions it names.

Stopping reports not-ready, stops accepting, lets in-flight calls finish (``SHUTDOWN_GRACE_S``),
then stops consuming registry events and closes the registry client.
"""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import CollectorRegistry

from maas import cpus
from maas.config import Settings
from maas.liveness import Liveness
from maas.registry import RegistryClient
from services.inference.server import InferenceServer
from services.inference.sources import RegistrySource

SHUTDOWN_GRACE_S = 10.0
log = logging.getLogger(__name__)


class InferenceProcess:
    def __init__(self, settings: Settings) -> None:
        self._registry = RegistryClient(settings, actor="maas-inference")
        self.server = InferenceServer(settings, RegistrySource(self._registry))
        self.server.liveness.dependencies.add("registry", self._registry.ping)
        if self.server.cpu_reservation is not None:
            # The whole server, its threads included, stays off the decode processes' CPUs.
            cpus.pin_process(self.server.cpu_reservation.rest)
            log.info(
                "decode processes on CPUs %s; the rest of the server on %s",
                cpus.render(self.server.cpu_reservation.reserved),
                cpus.render(self.server.cpu_reservation.rest),
            )

    @property
    def metrics_registry(self) -> CollectorRegistry:
        return self.server.metrics.registry

    @property
    def liveness(self) -> Liveness:
        return self.server.liveness

    async def start(self) -> None:
        await self._registry.start()
        await self.server.start()

    async def run(self) -> None:
        # Requests are served by the gRPC and HTTP servers; their loops are supervised inside.
        await asyncio.Event().wait()

    async def stop(self) -> None:
        try:
            await self.server.stop(SHUTDOWN_GRACE_S)
        finally:
            await self._registry.stop()
