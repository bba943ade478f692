"""The inference server: ``python -m services.inference``.

Config from MAAS_* (inference_listen, registry_addr, S3, Kafka, batching, token, metrics port).
SIGTERM/SIGINT: report not-ready, stop accepting, let in-flight calls finish (grace period),
then stop consuming registry events and close the registry client. ``/metrics`` and
``/healthz`` on MAAS_INFERENCE_METRICS_PORT.
"""

from __future__ import annotations

from maas.config import Settings
from maas.lifecycle import serve
from services.inference.process import InferenceProcess


def main() -> None:
    settings = Settings.from_env()
    serve(
        lambda: InferenceProcess(settings),
        settings,
        metrics_port=settings.inference_metrics_port,
    )


if __name__ == "__main__":
    main()
