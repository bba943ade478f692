"""The bus's pure steps: decoding records and classifying failures, without a broker."""

import pytest
from aiokafka import ConsumerRecord

from maas import events
from maas.bus import dead_letter_for, decode_value, is_poison, to_record
from maas.errors import InvalidArgument, NotFound, SchemaViolation, Unavailable


def raw(value: bytes, key: bytes | None = b"job-1", headers=()) -> ConsumerRecord:
    return ConsumerRecord(
        topic="maas.jobs.v1",
        partition=2,
        offset=41,
        timestamp=1,
        timestamp_type=0,
        key=key,
        value=value,
        checksum=None,
        serialized_key_size=0,
        serialized_value_size=len(value),
        headers=list(headers),
    )


def test_a_valid_record_decodes_with_its_origin():
    event = events.new_event(events.JOB_STATUS, job_id="job-1", state="running")
    record = raw(events.encode(event))
    decoded = to_record(record, decode_value(record), [events.JOB_STATUS])
    assert (decoded.topic, decoded.partition, decoded.offset, decoded.key) == (
        "maas.jobs.v1",
        2,
        41,
        "job-1",
    )
    assert decoded.event == event


def test_the_wrong_schema_for_the_topic_is_a_violation():
    event = events.new_event(events.JOB_STATUS, job_id="job-1", state="running")
    record = raw(events.encode(event))
    with pytest.raises(SchemaViolation):
        to_record(record, decode_value(record), [events.JOB])


@pytest.mark.parametrize(
    ("error", "poison"),
    [
        (InvalidArgument("bad lr"), True),
        (NotFound("no model"), True),
        (Unavailable("s3 down"), False),
        (RuntimeError("bug"), False),
    ],
)
def test_only_non_retriable_platform_errors_are_poison(error, poison):
    assert is_poison(error) is poison


def test_a_dead_letter_keeps_the_original_bytes_key_and_reason():
    record = raw(b"\x01\x02", headers=[("content-type", b"application/json")])
    letter = dead_letter_for(record, InvalidArgument("training.lr must be > 0"), None)
    event = letter.to_event("maas-aggregator")
    events.validate(event)
    assert event["original"] == b"\x01\x02"
    assert event["reason"] == {"code": "invalid_argument", "message": "training.lr must be > 0"}
    assert event["original_headers"] == {"content-type": "application/json"}
    assert letter.key == "job-1"


def test_an_unexpected_exception_is_described_by_its_type():
    letter = dead_letter_for(raw(b""), KeyError("x"), None)
    assert letter.code == "handler_failed" and "KeyError" in letter.message
