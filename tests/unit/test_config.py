"""Settings come from the environment, with units in names and secrets never printed."""

import re
from pathlib import Path

import pytest

from maas.cli import main
from maas.config import Settings, env_doc, known_env_names
from maas.errors import InvalidArgument

OPERATIONS = Path(__file__).resolve().parents[2] / "docs" / "OPERATIONS.md"


def test_defaults_point_at_the_local_stack():
    settings = Settings.from_env({})
    assert settings.kafka_bootstrap == "127.0.0.1:9092"
    assert settings.s3_endpoint == "127.0.0.1:9000"


def test_env_overrides_are_parsed_by_type():
    settings = Settings.from_env(
        {"MAAS_KAFKA_MAX_MESSAGE_BYTES": "1048576", "MAAS_S3_SECURE": "true"}
    )
    assert settings.kafka_max_message_bytes == 1048576
    assert settings.s3_secure is True


def test_a_bad_integer_names_the_variable():
    with pytest.raises(InvalidArgument, match="MAAS_CODEC_CHUNK_BYTES"):
        Settings.from_env({"MAAS_CODEC_CHUNK_BYTES": "lots"})


def test_a_boolean_that_is_none_says_every_spelling_accepted():
    with pytest.raises(InvalidArgument, match=r"MAAS_AUTH='banana'.* \(or on/off, yes/no, 1/0\)"):
        Settings.from_env({"MAAS_AUTH": "banana"})


@pytest.mark.parametrize(
    ("env", "raw", "accepted"),
    [
        ("MAAS_KAFKA_SECURITY_PROTOCOL", "SASL", "PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL"),
        ("MAAS_KAFKA_SASL_MECHANISM", "GSSAPI", "SCRAM-SHA-512, SCRAM-SHA-256, PLAIN"),
        ("MAAS_LOG_LEVEL", "LOUD", "DEBUG, INFO, WARNING, ERROR, CRITICAL"),
    ],
)
def test_a_setting_with_named_values_refuses_others_listing_them(env, raw, accepted):
    with pytest.raises(InvalidArgument, match=f"{env}='{raw}'; use one of {accepted}"):
        Settings.from_env({env: raw})


def test_named_values_are_read_whatever_their_case():
    settings = Settings.from_env(
        {"MAAS_KAFKA_SECURITY_PROTOCOL": "sasl_ssl", "MAAS_LOG_LEVEL": "debug"}
    )
    assert (settings.kafka_security_protocol, settings.log_level) == ("SASL_SSL", "DEBUG")


@pytest.mark.parametrize(
    ("raw", "told"),
    [
        ("http://127.0.0.1:9000", "e.g. 127.0.0.1:9000, without a scheme or path"),
        ("https://minio.example:443", "; for https set MAAS_S3_SECURE=true"),
        ("minio:9000/maas-models", "e.g. minio:9000, without a scheme or path"),
        ("minio:ninety", "give host:port"),
    ],
)
def test_an_s3_endpoint_written_as_a_url_is_refused_saying_how_to_write_it(raw, told):
    with pytest.raises(InvalidArgument, match="MAAS_S3_ENDPOINT=") as refused:
        Settings.from_env({"MAAS_S3_ENDPOINT": raw})
    assert told in refused.value.message


@pytest.mark.parametrize("raw", ["minio:9000", "minio", "[::1]:9000", "s3.example.com:443"])
def test_an_s3_endpoint_of_host_and_port_is_taken(raw):
    assert Settings.from_env({"MAAS_S3_ENDPOINT": raw}).s3_endpoint == raw


def test_describe_masks_secrets():
    described = Settings.from_env({"MAAS_S3_SECRET_KEY": "hunter2"}).describe()
    assert described["MAAS_S3_SECRET_KEY"] == "***"
    assert "hunter2" not in str(described)


def test_every_setting_is_documented_and_known():
    rows = set(re.findall(r"^\| `(MAAS_[A-Z0-9_]+)` \|", OPERATIONS.read_text(), re.MULTILINE))
    names = {name for name, _default, _doc in env_doc()}
    assert names - rows == set(), "add these to docs/OPERATIONS.md (`maas config --markdown`)"
    assert rows - known_env_names() == set(), "docs/OPERATIONS.md lists settings nothing reads"
    assert all(doc for _name, _default, doc in env_doc())


def test_the_settings_table_in_the_docs_is_what_maas_config_markdown_prints(capsys, monkeypatch):
    for variable in ("XDG_STATE_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(variable, raising=False)
    assert main(["config", "--markdown"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed in OPERATIONS.read_text(), "paste `maas config --markdown` into OPERATIONS.md"
