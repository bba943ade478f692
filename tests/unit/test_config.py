"""Settings come from the environment, with units in names and secrets never printed."""

import re
from pathlib import Path

import pytest

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
