"""The inference service's HTTP listener: one aiohttp application that route modules add to.

A module that serves HTTP (the OpenAI-compatible API, the OIP REST endpoints) exposes an object
with ``add_to(app)``; the server calls it for each before ``start`` and owns the listener's
lifetime. Handlers run on the server's event loop, beside the gRPC server.
"""

from __future__ import annotations

import logging
from typing import Protocol

from aiohttp import web

from maas.errors import InvalidArgument

log = logging.getLogger(__name__)


class Routes(Protocol):
    def add_to(self, app: web.Application) -> None: ...


class HttpServer:
    def __init__(
        self,
        listen: str,
        *,
        setting: str = "MAAS_INFERENCE_HTTP_LISTEN",
        max_body_bytes: int = 1024 * 1024,
    ) -> None:
        host, sep, port = listen.rpartition(":")
        if not sep or not port.isdigit():
            raise InvalidArgument(f"{setting}={listen!r} must be host:port, e.g. 127.0.0.1:8000")
        self._host, self._port, self._setting = host.strip("[]") or "0.0.0.0", int(port), setting
        self.app = web.Application(client_max_size=max_body_bytes)
        self._runner: web.AppRunner | None = None
        self.port = 0

    def add(self, routes: Routes) -> None:
        routes.add_to(self.app)

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise InvalidArgument(f"cannot bind {self._setting}: {exc}") from None
        # Port 0 binds a free port: read back the one the listener got.
        self.port = int(self._runner.addresses[0][1])
        log.info("inference HTTP on %s:%d", self._host, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
