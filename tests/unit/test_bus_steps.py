"""The bus's pure steps: decoding records and classifying failures, without a broker."""

import hashlib

import msgpack
import pytest
from aiokafka import ConsumerRecord

from maas import events
from maas.bus import (
    MAX_DLQ_BACKOFF_S,
    dead_letter_for,
    decode_value,
    dlq_backoff_s,
    is_poison,
    read_headers,
    read_record,
    to_record,
)
from maas.deadletter import FRAMING_BYTES
from maas.errors import InvalidArgument, NotFound, SchemaViolation, Unavailable


def nested(depth: int) -> list:
    node: list = []
    for _ in range(depth):
        node = [node]
    return node


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


def test_a_reason_quoting_a_lone_surrogate_is_written_with_it_escaped():
    letter = dead_letter_for(raw(b"{}"), InvalidArgument("model.config.\udc80: unknown key"), None)
    assert letter.message == "model.config.\\udc80: unknown key"
    events.encode(letter.to_event("maas-aggregator"))  # msgpack cannot carry a lone surrogate


def test_an_unexpected_exception_is_described_by_its_type():
    letter = dead_letter_for(raw(b""), KeyError("x"), None)
    assert letter.code == "handler_failed" and "KeyError" in letter.message


def test_null_and_binary_header_values_are_read_not_fatal():
    record = raw(b"\x80", headers=[("trace", None), ("blob", b"\xff\x00"), ("content-type", None)])
    assert read_headers(record) == [("trace", None), ("blob", b"\xff\x00"), ("content-type", None)]
    with pytest.raises(SchemaViolation, match="schema must be a string"):  # {}: no schema
        read_record(record, None)
    letter = dead_letter_for(record, SchemaViolation("no schema"), None).to_event("g")
    assert letter["original_headers"] == {"trace": None, "blob": "\xff\x00", "content-type": None}


@pytest.mark.parametrize(
    "value",
    [
        msgpack.packb({"schema": {"not": "a string"}, "id": "x", "ts": 1}),
        msgpack.packb({"schema": ["maas.job/1"], "id": "x", "ts": 1}),
        msgpack.packb({1: "int key"}),
        msgpack.packb({"schema": "maas.job/1", "deep": nested(200)}),
        b"",
        b"\xc1",
        msgpack.packb([1, 2, 3]),
    ],
    ids=["schema-map", "schema-list", "int-key", "deep", "empty", "reserved-byte", "not-a-map"],
)
def test_every_unreadable_record_is_a_schema_violation(value):
    with pytest.raises(SchemaViolation):
        read_record(raw(value), [events.JOB])


def test_a_reader_bug_on_odd_bytes_still_counts_as_this_records_fault(monkeypatch):
    def explode(*_args, **_kwargs):
        raise TypeError("unhashable type: 'dict'")

    monkeypatch.setattr(events, "validate", explode)
    good = raw(events.encode(events.new_event(events.JOB_STATUS, job_id="j", state="running")))
    with pytest.raises(SchemaViolation, match="TypeError"):
        read_record(good, [events.JOB_STATUS])


@pytest.mark.parametrize("limit", [64 * 1024, 1024 * 1024])
def test_a_near_limit_record_gets_a_dead_letter_that_fits_the_limit(limit):
    value = bytes(range(256)) * (limit // 256)  # as big as the broker allows
    record = raw(value, key=b"k" * 5000, headers=[(f"h{i}", b"v" * 5000) for i in range(100)])
    letter = dead_letter_for(record, SchemaViolation("x" * 100_000), None)
    event = letter.to_event("maas-group", limit)
    encoded = events.encode(events.validate(event))
    assert len(encoded) + len(letter.dlq_key.encode()) + FRAMING_BYTES <= limit
    assert event["original_truncated"] is True
    assert value.startswith(event["original"]) and len(event["original"]) > limit // 2
    assert event["original_size"] == len(value)
    assert event["original_sha256"] == hashlib.sha256(value).hexdigest()
    assert len(event["reason"]["message"]) < 3000


def test_a_small_record_is_dead_lettered_whole():
    event = dead_letter_for(raw(b"abc"), SchemaViolation("bad"), None).to_event("g", 1 << 20)
    assert event["original"] == b"abc" and event["original_truncated"] is False


def test_dlq_retries_back_off_and_stay_bounded():
    waits = [dlq_backoff_s(n, 200) for n in range(1, 12)]
    assert waits[:3] == [0.2, 0.4, 0.8]
    assert waits == sorted(waits) and max(waits) == MAX_DLQ_BACKOFF_S
