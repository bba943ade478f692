"""The model registry server: ``python -m services.model_registry``.

Config from MAAS_* (registry_listen, S3, Kafka, state_dir, auth, TLS); metadata in
``$MAAS_STATE_DIR/registry/registry.db``. SIGTERM/SIGINT: stop accepting, let running calls
finish (grace period), stop the outbox relay, then close S3, Kafka and SQLite. ``/metrics`` and
``/healthz`` on MAAS_METRICS_PORT (the stack and Compose give it 9101; 0: gRPC health only).
"""

from __future__ import annotations

from maas.config import Settings
from maas.lifecycle import serve
from services.model_registry.process import RegistryProcess


def main() -> None:
    settings = Settings.from_env()
    serve(lambda: RegistryProcess(settings), settings)


if __name__ == "__main__":
    main()
