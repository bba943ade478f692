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
``/metrics`` and ``/healthz`` on MAAS_METRICS_PORT.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from maas.allocator import keep_freed_memory
from maas.config import Settings
from maas.errors import InvalidArgument
from maas.lifecycle import Service, serve

ROLES = ("shard", "coordinator")


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


def main() -> None:
    keep_freed_memory()  # before the first step's allocations (see maas.allocator)
    settings = Settings.from_env()
    serve(
        lambda: build(settings, os.environ),
        settings,
        compute_threads=settings.training_compute_threads,
    )


if __name__ == "__main__":
    main()
