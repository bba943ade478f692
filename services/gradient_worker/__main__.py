"""The gradient worker: ``python -m services.gradient_worker``.

Config from MAAS_* only: a worker has no fixed id (run as many as you like; each joins the
training pool on its own and the coordinator assigns it to jobs). SIGTERM/SIGINT: say ``down``,
stop computing, close the data-plane streams. A worker that leaves mid-job loses its rank once its
heartbeats stop (MAAS_WORKER_HEARTBEAT_TIMEOUT_MS); the rank goes to a free worker, which joins
at the job's current version. ``/metrics`` and ``/healthz`` on MAAS_METRICS_PORT.
"""

from __future__ import annotations

from maas.allocator import keep_freed_memory
from maas.config import Settings
from maas.lifecycle import serve
from services.gradient_worker.service import WorkerService


def main() -> None:
    keep_freed_memory()  # before the first step's allocations (see maas.allocator)
    settings = Settings.from_env()
    serve(
        lambda: WorkerService(settings),
        settings,
        compute_threads=settings.training_compute_threads,
    )


if __name__ == "__main__":
    main()
