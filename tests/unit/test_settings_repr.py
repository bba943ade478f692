"""No secret setting shows in ``repr(settings)``: a log line, error message or traceback that
prints the settings must not carry the S3 secret, the Kafka password or a bearer token."""

from __future__ import annotations

import dataclasses

from maas.config import Settings


def test_no_secret_setting_is_in_the_settings_repr() -> None:
    secrets = {
        f.name: f"secret-{f.name}-0123456789"
        for f in dataclasses.fields(Settings)
        if f.metadata["secret"]
    }
    assert {"s3_secret_key", "kafka_sasl_password", "auth_token"} <= set(secrets)
    shown = repr(Settings().replace(**secrets))
    assert [name for name, value in secrets.items() if value in shown] == []
    assert "kafka_bootstrap=" in shown  # the rest still shows
