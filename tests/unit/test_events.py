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


def test_each_reason_is_given_once():
    # The envelope's checks came twice over (its schema and the event's), crowding out the rest.
    with pytest.raises(SchemaViolation) as refused:
        events.validate({"schema": "maas.member/1"}, events.MEMBER)
    reasons = str(refused.value).split("; ")
    assert len(reasons) == len(set(reasons)) and "(event): 'id' is a required property" in reasons


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


def test_json_without_a_content_type_is_read_as_json():
    # kcat and most producers send no headers; an object's text is no msgpack map anyway.
    job = a_job()
    assert events.decode(json.dumps(job).encode()) == job


def test_json_led_by_whitespace_without_a_content_type_is_read_as_json():
    assert events.decode(b' \n\t{"a": 1}') == {"a": 1}


def test_a_declared_msgpack_value_is_not_read_as_json():
    with pytest.raises(SchemaViolation, match="not valid msgpack"):
        events.decode(b'{"a": 1}', [("content-type", b"application/msgpack")])


def test_undeclared_json_that_is_not_valid_says_so_as_json():
    with pytest.raises(SchemaViolation, match="not valid JSON"):
        events.decode(b'{"a": ')


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
    }


def deep(depth: int) -> list:
    node: list = []
    for _ in range(depth):
        node = [node]
    return node


@pytest.mark.parametrize("schema", [{"a": 1}, ["maas.job/1"], 7, None, b"maas.job/1"])
def test_a_schema_field_that_is_not_text_is_a_violation_naming_it(schema):
    with pytest.raises(SchemaViolation, match="schema must be a string"):
        events.validate(a_job(schema=schema), events.JOB)


def test_nesting_deeper_than_the_limit_is_refused_without_recursing():
    value = events.encode(a_job(model={"config": {"x": deep(40)}}))
    with pytest.raises(SchemaViolation, match="deeper than 32"):
        events.decode(value, max_depth=32)
    assert events.decode(value, max_depth=64)["job_id"] == "job-1"


def test_json_nested_past_the_interpreters_recursion_limit_is_a_violation():
    value = b"[" * 200_000 + b"]" * 200_000
    with pytest.raises(SchemaViolation, match="not valid JSON|deeper"):
        events.decode(value, [("content-type", b"application/json")])


@pytest.mark.parametrize(
    ("text", "where"),
    [
        (b'{"job_id": "a\\udc80"}', "job_id"),
        (b'{"model": {"\\ud83d": 1}}', r"model\.\\ud83d"),
        (b'{"tags": ["x", "\\udfff"]}', r"tags\.1"),
    ],
)
def test_json_text_holding_a_lone_surrogate_is_refused_naming_where(text, where):
    with pytest.raises(SchemaViolation, match=f"{where} holds a lone UTF-16 surrogate") as caught:
        events.decode(text, [("content-type", b"application/json")])
    caught.value.message.encode()  # the reason itself can be sent on


def test_json_text_holding_a_surrogate_pair_is_the_character_it_spells():
    value = b'{"note": "\\ud83d\\ude00"}'
    assert events.decode(value, [("content-type", b"application/json")])["note"] == "\U0001f600"


@pytest.mark.parametrize(
    "overrides",
    [
        {"job_id": "job-1\n"},
        {"model": {"name": "digits-mlp\n", "arch": "mlp"}},
        {"dataset": {"uri": "builtin:digits\n"}},
    ],
    ids=["job_id", "model.name", "dataset.uri"],
)
def test_a_final_newline_does_not_pass_a_pattern(overrides):
    # JSON Schema's "$" is the end of the text; Python's also matches before a final newline.
    with pytest.raises(SchemaViolation, match=r"\\n' does not match"):
        events.validate(a_job(**overrides))


def test_map_keys_must_be_text():
    import msgpack

    value = msgpack.packb({"schema": "maas.job/1", "model": {b"name": "x"}})
    with pytest.raises(SchemaViolation, match="model has a bytes key"):
        events.decode(value)


def test_a_null_content_type_header_means_msgpack():
    event = a_job()
    assert events.decode(events.encode(event), [("content-type", None)]) == event


def test_two_different_content_type_headers_are_a_violation_naming_both():
    headers = [("content-type", b"application/msgpack"), ("Content-Type", b"application/json")]
    with pytest.raises(SchemaViolation, match="2 different content-type headers.*send one"):
        events.decode(json.dumps(a_job()).encode(), headers)


def test_a_repeated_identical_content_type_header_is_read():
    headers = [("content-type", b"application/json")] * 2
    job = a_job()
    assert events.decode(json.dumps(job).encode(), headers) == job


def test_an_undecodable_msgpack_value_says_why_even_when_msgpack_does_not():
    with pytest.raises(SchemaViolation, match=r"not valid msgpack: \w"):
        events.decode(b"\xc1" * 8)


def test_a_job_with_many_unknown_keys_names_the_first_few_and_counts_the_rest():
    job = a_job(**{f"bogus{i}": 1 for i in range(10_000)})
    with pytest.raises(SchemaViolation, match="10000 unknown keys, the first 5: bogus0: unknown"):
        events.validate(job, events.JOB)


def test_a_huge_offending_value_is_clipped_in_the_reason():
    job = a_job(job_id="x" * 1_000_000)
    with pytest.raises(SchemaViolation) as caught:
        events.validate(job, events.JOB)
    assert len(caught.value.message) <= events.MAX_REASON_CHARS + 40


@pytest.mark.parametrize(
    ("event", "fields", "missing"),
    [
        ("registered", {}, "version"),
        ("alias-set", {"alias": "production"}, "version"),
        ("alias-set", {"version": 2}, "alias"),
        ("alias-deleted", {}, "alias"),
    ],
)
def test_a_model_event_without_the_field_its_kind_needs_is_refused_naming_it(
    event, fields, missing
):
    record = events.new_event(events.MODEL, event=event, name="m", **fields)
    with pytest.raises(SchemaViolation, match=rf"'{missing}' is a required property"):
        events.validate(record, events.MODEL)


def test_a_model_deleted_event_without_a_version_deletes_the_whole_model_and_is_valid():
    record = events.new_event(events.MODEL, event="deleted", name="m")
    assert events.validate(record, events.MODEL)["name"] == "m"
