"""The aggregator: ``python -m services.aggregator``.

``MAAS_AGGREGATOR_ROLE`` picks what this replica is:

- ``shard`` (default): a parameter-server shard of the training pool (no fixed index: run as
  many as you like; the coordinator assigns them partitions). Numpy only: no torch in its memory.
- ``coordinator``: the single replica that accepts training jobs, plans them, and evaluates
  and registers the result.

SIGTERM/SIGINT: say ``down``, let an in-flight checkpoint finish, close clients. A shard killed
outright loses nothing durable: once its heartbeats stop, its partitions move to a live shard
(or to it, restarted), which resumes each from its last checkpoint, and the workers, which keep
every gradient a checkpoint does not cover yet, push those again when they reconnect.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from typing import Protocol

from prometheus_client import CollectorRegistry, start_http_server

from maas.config import Settings
from maas.errors import InvalidArgument
from maas.lifecycle import (
    configure_logging,
    limit_compute_threads,
    run_until_signalled,
    run_until_stopped,
)

log = logging.getLogger("services.aggregator")

ROLES = ("shard", "coordinator")


class Service(Protocol):
    @property
    def metrics_registry(self) -> CollectorRegistry: ...

    async def start(self) -> None: ...
    async def run(self) -> None: ...
    async def stop(self) -> None: ...


def build(settings: Settings, environ: Mapping[str, str]) -> Service:
    role = environ.get("MAAS_AGGREGATOR_ROLE", "shard")
    if role == "coordinator":
        from services.aggregator.coordinator import Coordinator

        return Coordinator(settings)
    if role != "shard":
        raise InvalidArgument(f"MAAS_AGGREGATOR_ROLE={role!r} is unknown; use one of {ROLES}")
    # Imported here so a shard process never loads the coordinator's torch.
    from services.aggregator.shard import ShardService

    return ShardService(settings)


async def serve(
    service: Service, stop: asyncio.Event, metrics_port: int = 0, metrics_bind: str = "127.0.0.1"
) -> None:
    try:
        await service.start()
        if metrics_port:
            # Opened once started: the port answering means the replica is consuming.
            start_http_server(metrics_port, addr=metrics_bind, registry=service.metrics_registry)
        log.info("%s running", type(service).__name__)
        await run_until_stopped(service.run(), stop)
        log.info("shutting down")
    finally:
        await service.stop()
        log.info("stopped")


def main() -> None:
    settings = Settings.from_env()
    configure_logging(settings)
    service = build(settings, os.environ)
    limit_compute_threads(settings.training_compute_threads)
    run_until_signalled(
        lambda stop: serve(service, stop, settings.metrics_port, settings.metrics_bind)
    )


if __name__ == "__main__":
    main()
