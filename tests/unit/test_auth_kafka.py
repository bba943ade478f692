"""Kafka client security from config: the keywords every aiokafka client of the platform gets."""

from __future__ import annotations

import ssl

import pytest

from maas.config import Settings
from maas.errors import InvalidArgument
from maas.kafka_security import kafka_client_kwargs


def test_plaintext_is_the_local_default():
    assert kafka_client_kwargs(Settings()) == {"security_protocol": "PLAINTEXT"}


def test_sasl_ssl_with_scram_carries_the_credentials_and_a_tls_context():
    settings = Settings.from_env(
        {
            "MAAS_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "MAAS_KAFKA_SASL_MECHANISM": "SCRAM-SHA-256",
            "MAAS_KAFKA_SASL_USERNAME": "maas",
            "MAAS_KAFKA_SASL_PASSWORD": "pw",
        }
    )
    kwargs = kafka_client_kwargs(settings)
    context = kwargs.pop("ssl_context")
    assert isinstance(context, ssl.SSLContext) and context.verify_mode is ssl.CERT_REQUIRED
    assert kwargs == {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-256",
        "sasl_plain_username": "maas",
        "sasl_plain_password": "pw",
    }


def test_ssl_alone_has_a_context_and_no_sasl():
    kwargs = kafka_client_kwargs(Settings(kafka_security_protocol="ssl"))
    assert kwargs["security_protocol"] == "SSL" and "ssl_context" in kwargs
    assert not any(k.startswith("sasl") for k in kwargs)


async def test_the_keywords_build_real_aiokafka_clients():
    """aiokafka validates security arguments when a client is built (not started here)."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient

    settings = Settings(
        kafka_security_protocol="SASL_SSL", kafka_sasl_username="u", kafka_sasl_password="p"
    )
    for client in (AIOKafkaConsumer, AIOKafkaProducer, AIOKafkaAdminClient):
        client(bootstrap_servers="127.0.0.1:1", **kafka_client_kwargs(settings))
    with pytest.raises(ValueError):  # the same check refuses an incomplete set
        AIOKafkaConsumer(
            bootstrap_servers="127.0.0.1:1", security_protocol="SASL_SSL", sasl_mechanism="PLAIN"
        )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"kafka_security_protocol": "TLS"}, "MAAS_KAFKA_SECURITY_PROTOCOL='TLS'; use one of"),
        (
            {"kafka_security_protocol": "SASL_SSL", "kafka_sasl_mechanism": "GSSAPI"},
            "MAAS_KAFKA_SASL_MECHANISM='GSSAPI'",
        ),
        (
            {"kafka_security_protocol": "SASL_SSL", "kafka_sasl_username": "u"},
            "needs MAAS_KAFKA_SASL_USERNAME and MAAS_KAFKA_SASL_PASSWORD",
        ),
    ],
)
def test_a_wrong_setting_is_refused_naming_it(changes, message):
    with pytest.raises(InvalidArgument, match=message):
        kafka_client_kwargs(Settings(**changes))
