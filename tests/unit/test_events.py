"""Event envelope, encoding and schema validation."""

import json

import pytest

from maas import events
from maas.errors import SchemaViolation


def a_job(**overrides):
    job = events.new_event(
        events.JOB,
        job_id="job-1",
        type="train",
        model={"name": "digits-mlp", "arch": "mlp"},
        dataset={"uri": "builtin:digits"},
        training={"steps": 10, "optimizer": {"name": "sgd", "lr": 0.1}},
    )
    job.update(overrides)
    return job


def test_new_event_has_schema_unique_id_and_millisecond_timestamp():
    a, b = events.new_event(events.JOB_STATUS), events.new_event(events.JOB_STATUS)
    assert a["schema"] == events.JOB_STATUS
    assert a["id"] != b["id"]
    assert a["ts"] > 1_600_000_000_000


def test_a_valid_job_passes():
    assert events.validate(a_job(), events.JOB)["job_id"] == "job-1"


def test_negative_learning_rate_is_named_in_the_error():
    job = a_job(training={"optimizer": {"name": "sgd", "lr": -0.1}})
    with pytest.raises(SchemaViolation, match=r"training\.optimizer\.lr"):
        events.validate(job)


def test_missing_envelope_field_is_refused():
    job = a_job()
    del job["id"]
    with pytest.raises(SchemaViolation, match="'id' is a required property"):
        events.validate(job)


def test_unknown_schema_is_refused_with_the_known_ones():
    with pytest.raises(SchemaViolation, match="maas.job/1"):
        events.validate({"schema": "maas.nope/1", "id": "x", "ts": 1})


def test_a_schema_other_than_the_expected_one_is_refused():
    with pytest.raises(SchemaViolation, match="not accepted here"):
        events.validate(a_job(), events.MODEL)


def test_msgpack_round_trip_keeps_bytes_fields():
    letter = events.new_event(
        events.DLQ,
        source_topic="t",
        partition=0,
        offset=3,
        reason={"code": "c", "message": "m"},
        original=b"\x00\xff",
    )
    decoded = events.decode(events.encode(letter))
    assert decoded["original"] == b"\x00\xff"
    events.validate(decoded)


def test_json_is_accepted_when_the_header_says_so():
    job = a_job()
    decoded = events.decode(json.dumps(job).encode(), [("content-type", b"application/json")])
    assert decoded == job


def test_undecodable_bytes_are_a_schema_violation():
    with pytest.raises(SchemaViolation, match="not valid msgpack"):
        events.decode(b"\xc1\xc1\xc1")


def test_a_non_map_value_is_a_schema_violation():
    with pytest.raises(SchemaViolation, match="must decode to a map"):
        events.decode(events.encode([1, 2, 3]))  # type: ignore[arg-type]


def test_every_schema_file_is_loaded():
    assert set(events.known_schemas()) >= {
        events.JOB,
        events.JOB_STATUS,
        events.MODEL,
        events.DLQ,
        events.GRADIENT,
        events.PARAMS,
    }
