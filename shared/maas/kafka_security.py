"""How every Kafka client of the platform connects: PLAINTEXT locally, SSL / SASL_SSL (SCRAM)
against a secured cluster, all from config (MAAS_KAFKA_SECURITY_PROTOCOL, ..._SASL_*,
..._SSL_CA_FILE).

    AIOKafkaProducer(bootstrap_servers=..., **kafka_client_kwargs(settings), ...)

The same keywords fit AIOKafkaProducer, AIOKafkaConsumer and AIOKafkaAdminClient.
"""

from __future__ import annotations

from typing import Any

from maas.config import KAFKA_PROTOCOLS as PROTOCOLS
from maas.config import KAFKA_SASL_MECHANISMS as MECHANISMS
from maas.config import Settings
from maas.errors import InvalidArgument


def _one_of(env: str, value: str, accepted: tuple[str, ...]) -> str:
    """``value`` upper-cased if it is one of ``accepted``; else InvalidArgument naming ``env``."""
    upper = value.upper()
    if upper not in accepted:
        raise InvalidArgument(f"{env}={value!r}; use one of {', '.join(accepted)}")
    return upper


def kafka_client_kwargs(settings: Settings) -> dict[str, Any]:
    """security_protocol, sasl_* and ssl_context keywords for an aiokafka client."""
    protocol = _one_of("MAAS_KAFKA_SECURITY_PROTOCOL", settings.kafka_security_protocol, PROTOCOLS)
    kwargs: dict[str, Any] = {"security_protocol": protocol}
    if protocol.startswith("SASL_"):
        kwargs |= _sasl(settings)
    if protocol.endswith("SSL"):
        from aiokafka.helpers import create_ssl_context

        kwargs["ssl_context"] = create_ssl_context(cafile=settings.kafka_ssl_ca_file or None)
    return kwargs


def _sasl(settings: Settings) -> dict[str, Any]:
    mechanism = _one_of("MAAS_KAFKA_SASL_MECHANISM", settings.kafka_sasl_mechanism, MECHANISMS)
    if not settings.kafka_sasl_username or not settings.kafka_sasl_password:
        raise InvalidArgument(
            f"MAAS_KAFKA_SECURITY_PROTOCOL={settings.kafka_security_protocol} needs "
            "MAAS_KAFKA_SASL_USERNAME and MAAS_KAFKA_SASL_PASSWORD"
        )
    return {
        "sasl_mechanism": mechanism,
        "sasl_plain_username": settings.kafka_sasl_username,
        "sasl_plain_password": settings.kafka_sasl_password,
    }
