"""The compressor: ``python -m services.compressor``.

Config from MAAS_* (Kafka, S3, registry address). SIGTERM/SIGINT: stop consuming (the job in
progress is not committed, so it is redelivered and resumes), then close the registry client
and the producer. ``/metrics`` and ``/healthz`` on MAAS_METRICS_PORT.
"""

from __future__ import annotations

from maas.config import Settings
from maas.lifecycle import serve
from services.compressor.service import CompressorService


def main() -> None:
    settings = Settings.from_env()
    serve(
        lambda: CompressorService(settings),
        settings,
        compute_threads=settings.compressor_torch_threads,
    )


if __name__ == "__main__":
    main()
