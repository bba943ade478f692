"""Hypothesis-generated hostile records on the jobs, job-status, models and training control
topics, read by the bus's consumer loop as the services run it (each topic's schemas), on the
real broker.

Random bytes, mutated events (wrong-typed fields, a `schema` that is not text, fields removed,
JSON text holding lone surrogates),
flipped and cut bytes, null and binary headers, nesting far past the limit and records right
under the broker's size limit; then one valid event. Every fuzzed record must be handled or be
in the DLQ with a reason (never both, never neither), the valid event is handled, the loop is
still running and the process's RSS stayed bounded.

MAAS_FUZZ_RECORDS sets the count per topic (CI: 200; the issue's figure: 2000).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any

import msgpack
import psutil
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from fuzzing import consuming, drawing
from hypothesis import given
from hypothesis import strategies as st
from kafka_offsets import end_offsets, start_group_at_end

from maas import events, topics
from maas.bus import DeadLetter, EventProducer, Record

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

RECORDS = int(os.environ.get("MAAS_FUZZ_RECORDS", "200"))
MAX_HUGE = 4  # records right under the broker limit per template (each is that big)
TIGHT_SLACK = 160  # bytes under the limit of one of them: less than a DLQ envelope adds
RSS_GROWTH_LIMIT = 512 * 1024 * 1024

TEMPLATES: dict[str, dict[str, Any]] = {
    "jobs": events.new_event(
        events.JOB,
        job_id="fuzz-job",
        type="train",
        model={"name": "fuzz-mlp", "arch": "mlp"},
        dataset={"uri": "builtin:digits"},
        training={"steps": 1, "optimizer": {"name": "sgd", "lr": 0.1}},
    ),
    "job-status": events.new_event(events.JOB_STATUS, job_id="fuzz-job", state="running"),
    "models": events.new_event(events.MODEL, event="registered", name="fuzz-mlp", version=1),
    "training-control": events.new_event(
        events.MEMBER, member_id="fuzz-worker", kind="worker", state="up", address=""
    ),
}
# Further templates mutated on a topic (half the records each): the control topic carries
# assignments beside heartbeats.
MORE_TEMPLATES: dict[str, list[dict[str, Any]]] = {
    "training-control": [
        events.new_event(
            events.ASSIGNMENT,
            job_id="fuzz-job",
            state="assigned",
            epoch=1,
            workers=[{"rank": 0, "member": "fuzz-worker"}],
            shards=[{"partition": 0, "member": "fuzz-shard", "address": "127.0.0.1:1"}],
        )
    ]
}
TOPICS = {
    "jobs": topics.JOBS,
    "job-status": topics.JOB_STATUS,
    "models": topics.MODELS,
    "training-control": topics.TRAINING_CONTROL,
}
# What each topic's consuming service accepts (the coordinator's pool: heartbeats, assignments).
EXPECTED = {"training-control": [events.MEMBER, events.ASSIGNMENT]}


@dataclass
class Fuzzed:
    kind: str
    value: bytes | None
    key: bytes | None
    headers: list[tuple[str, bytes | None]]


# --- strategies ---------------------------------------------------------------------------------

# Lone surrogates included: JSON spells them (an unpaired "\\udc80" escape), msgpack cannot.
texts = st.text(st.characters(exclude_categories=()), max_size=30)
leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | texts
    | st.binary(max_size=40)
)
values = st.recursive(
    leaves,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(texts, children, max_size=4),
    max_leaves=12,
)
header_values = (
    st.none()
    | st.binary(max_size=40)
    | st.sampled_from(
        [b"application/json", b"application/msgpack", b"APPLICATION/JSON; charset=latin-1", b""]
    )
)
# A header key is text a producer encodes as UTF-8: a lone surrogate is no key a client can send
# (aiokafka refuses to encode it), so keys are drawn without them.
header_keys = st.text(st.characters(exclude_categories=("Cs",)), max_size=30)
headers = st.lists(
    st.tuples(st.sampled_from(["content-type", "trace", ""]) | header_keys, header_values),
    max_size=4,
)
keys = st.none() | st.binary(max_size=64)


def encode_somehow(event: dict[str, Any], as_json: bool) -> tuple[bytes, list]:
    """JSON or msgpack as asked; else the other (JSON has no bytes, msgpack no lone surrogate);
    else msgpack holding the surrogate's bytes, which are not UTF-8."""
    for json_first in (as_json, not as_json):
        try:
            if json_first:
                return json.dumps(event).encode(), [("content-type", b"application/json")]
            return msgpack.packb(event, use_bin_type=True), []
        except (TypeError, ValueError):
            continue
    return msgpack.packb(event, use_bin_type=True, unicode_errors="surrogatepass"), []


@st.composite
def mutated_event(draw: st.DrawFn, template: dict[str, Any]) -> tuple[str, bytes, list]:
    event = json.loads(json.dumps(template))
    field = draw(st.sampled_from([*template, "schema", "id", "ts"]) | texts)
    if draw(st.booleans()) and field in event:
        del event[field]
    else:
        event[field] = draw(values)
    value, extra = encode_somehow(event, draw(st.booleans()))
    return "mutated", value, extra


@st.composite
def lone_surrogate(draw: st.DrawFn, template: dict[str, Any]) -> tuple[str, bytes, list]:
    """Valid JSON that is not valid Unicode: an unpaired "\\udXXX" escape in a key or a value
    (a reason quoting it could not be written to the DLQ: the consumer stopped)."""
    event = json.loads(json.dumps(template))
    surrogate = chr(draw(st.integers(0xD800, 0xDFFF)))
    if draw(st.booleans()):
        event[f"key{surrogate}"] = 1
    else:
        event[draw(st.sampled_from(sorted(template)))] = f"value{surrogate}"
    return "surrogate", json.dumps(event).encode(), [("content-type", b"application/json")]


@st.composite
def damaged_bytes(draw: st.DrawFn, template: dict[str, Any]) -> tuple[str, bytes, list]:
    value = bytearray(events.encode(template))
    at = draw(st.integers(0, len(value) - 1))
    operation = draw(st.sampled_from(["cut", "flip", "insert"]))
    if operation == "cut":
        del value[at:]
    elif operation == "flip":
        value[at] ^= draw(st.integers(1, 255))
    else:
        value[at:at] = draw(st.binary(min_size=1, max_size=16))
    return "damaged", bytes(value), []


@st.composite
def deeply_nested(draw: st.DrawFn) -> tuple[str, bytes, list]:
    depth = draw(st.integers(33, 200_000))
    if draw(st.booleans()):
        return (
            "deep",
            b'{"a":' * depth + b"1" + b"}" * depth,
            [("content-type", b"application/json")],
        )
    return "deep", b"\x81\xa1a" * depth + b"\xc0", []  # {"a": {"a": ... nil}}


def near_limit_value(template: dict[str, Any], limit: int, schema: int, slack: int) -> bytes:
    """An event ``slack`` bytes under ``limit``; a number for `schema`: invalid whatever the
    padding holds."""
    event = dict(template, schema=schema)
    event["pad"] = "x" * (limit - slack - len(events.encode(event)))
    return events.encode(event)


@st.composite
def near_limit(draw: st.DrawFn, template: dict[str, Any], limit: int) -> tuple[str, bytes, list]:
    schema = draw(st.integers(-(2**63), 2**63 - 1))
    slack = draw(st.integers(1024, 16_384))  # room for the key, headers and Kafka framing
    return "huge", near_limit_value(template, limit, schema, slack), []


def tight(template: dict[str, Any], limit: int) -> Fuzzed:
    """So close to the limit (no key, no headers) that its DLQ envelope fits only cut."""
    return Fuzzed("tight", near_limit_value(template, limit, 7, TIGHT_SLACK), b"", [])


def records(template: dict[str, Any], limit: int) -> st.SearchStrategy[Fuzzed]:
    bodies = st.one_of(
        st.tuples(st.just("random"), st.binary(max_size=600), st.just([])),
        mutated_event(template),
        mutated_event(template),
        lone_surrogate(template),
        damaged_bytes(template),
        deeply_nested(),
        st.tuples(st.just("tombstone"), st.none(), st.just([])),
        near_limit(template, limit),
    )
    return st.builds(
        # Kafka takes no record without both (a tombstone needs its key).
        lambda body, key, extra: Fuzzed(
            body[0], body[1], b"" if key is None and body[1] is None else key, [*body[2], *extra]
        ),
        bodies,
        keys,
        headers,
    )


def generate(template: dict[str, Any], limit: int, count: int) -> list[Fuzzed]:
    out: list[Fuzzed] = []

    @drawing(count)
    @given(records(template, limit))
    def collect(record: Fuzzed) -> None:
        # Only MAX_HUGE of the ~1 in 7 near-limit records are kept, as they come: holding them
        # all made the test process peak at ~12 GB with 2 000 records.
        if record.kind != "huge":
            out.append(record)
        elif len(huge) < MAX_HUGE:
            huge.append(record)

    huge: list[Fuzzed] = []
    while len(out) < count - MAX_HUGE:  # hypothesis skips the examples it already tried
        collect()
    return out[: count - MAX_HUGE] + huge[: MAX_HUGE - 1] + [tight(template, limit)]


def generate_for(name: str, limit: int, count: int) -> list[Fuzzed]:
    """``count`` records for topic ``name``, shared out among its templates."""
    templates = [TEMPLATES[name], *MORE_TEMPLATES.get(name, [])]
    share = count // len(templates)
    out = [r for t in templates[1:] for r in generate(t, limit, share)]
    return generate(templates[0], limit, count - len(out)) + out


# --- the run ------------------------------------------------------------------------------------


async def produce(settings_, topic: str, fuzzed: list[Fuzzed]) -> dict[tuple[int, int], Fuzzed]:
    producer = AIOKafkaProducer(
        bootstrap_servers=settings_.kafka_bootstrap,
        enable_idempotence=True,
        acks="all",
        max_request_size=settings_.kafka_max_message_bytes,
    )
    await producer.start()
    try:
        sent = {}
        for record in fuzzed:
            meta = await producer.send_and_wait(
                topic, record.value, key=record.key, headers=record.headers or None
            )
            sent[(meta.partition, meta.offset)] = record
        return sent
    finally:
        await producer.stop()


async def dead_letters(settings_, since: dict[TopicPartition, int], group_id: str) -> dict:
    """(partition, offset) of the source record -> the DLQ event written by ``group_id``."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings_.kafka_bootstrap,
        max_partition_fetch_bytes=settings_.kafka_max_message_bytes,
        fetch_max_bytes=max(52_428_800, settings_.kafka_max_message_bytes),
    )
    await consumer.start()
    found = {}
    try:
        consumer.assign(list(since))
        for tp, offset in since.items():
            consumer.seek(tp, offset)
        ends = await consumer.end_offsets(list(since))
        while [tp for tp, end in ends.items() if await consumer.position(tp) < end]:
            for batch in (await consumer.getmany(timeout_ms=500)).values():
                for raw in batch:
                    letter = msgpack.unpackb(raw.value, raw=False)
                    if letter.get("consumer_group") == group_id:
                        found[(letter["partition"], letter["offset"])] = letter
    finally:
        await consumer.stop()
    return found


@pytest.mark.parametrize("name", sorted(TOPICS))
async def test_a_consumer_survives_every_fuzzed_record_and_still_handles_a_valid_one(stack, name):
    settings_ = stack.settings
    topic, template = TOPICS[name], TEMPLATES[name]
    started = time.monotonic()
    fuzzed = generate_for(name, settings_.kafka_max_message_bytes, RECORDS)
    generated_s = time.monotonic() - started
    group_id = f"fuzz-{name}-{uuid.uuid4().hex[:8]}"
    await start_group_at_end(settings_, topic, group_id)
    dlq_start = await end_offsets(settings_, topics.DLQ)
    rss_before = psutil.Process().memory_info().rss

    started = time.monotonic()
    sent = await produce(settings_, topic.name, fuzzed)
    produced_s = time.monotonic() - started
    huge = {
        where: (len(r.value or b""), hashlib.sha256(r.value or b"").hexdigest())
        for where, r in sent.items()
        if r.kind in ("huge", "tight")
    }
    del fuzzed
    valid = dict(template, id=uuid.uuid4().hex, ts=events.now_ms())
    valid_key = f"valid-{group_id}"

    handled: dict[tuple[int, int], Record] = {}
    rejected: set[tuple[int, int]] = set()
    valid_seen = asyncio.Event()

    async def handle(record: Record) -> None:
        handled[(record.partition, record.offset)] = record
        if record.key == valid_key:
            valid_seen.set()

    async def on_dead_letter(letter: DeadLetter) -> None:
        rejected.add((letter.partition, letter.offset))

    async def everything_accounted_for() -> None:
        await valid_seen.wait()
        while not set(sent) <= set(handled) | rejected:
            await asyncio.sleep(0.2)

    async with EventProducer(settings_, client_id=group_id) as producer:
        schemas = EXPECTED.get(name, [template["schema"]])
        started = time.monotonic()
        async with consuming(
            settings_, producer, topic, group_id, handle, on_dead_letter, schemas
        ) as running:
            accounted = asyncio.create_task(everything_accounted_for())
            try:
                await producer.send(topic, valid, key=valid_key)
                # A loop that ends fails the test at once, not after the whole wait.
                await asyncio.wait(
                    {accounted, running}, timeout=600, return_when=asyncio.FIRST_COMPLETED
                )
                consumed_s = time.monotonic() - started
                assert not running.done(), f"the consumer loop ended: {running.exception()!r}"
                assert accounted.done(), "the records were not all handled or dead-lettered"
            finally:
                accounted.cancel()
                await asyncio.gather(accounted, return_exceptions=True)
    rss_growth = psutil.Process().memory_info().rss - rss_before

    letters = await dead_letters(settings_, dlq_start, group_id)
    mine_handled = set(handled) & set(sent)
    mine_dead = set(letters) & set(sent)
    assert mine_handled | mine_dead == set(sent), (
        "a fuzzed record was neither handled nor dead-lettered"
    )
    assert not mine_handled & mine_dead
    assert all(letters[w]["reason"]["code"] and letters[w]["reason"]["message"] for w in mine_dead)
    for where, (size, sha) in huge.items():
        assert letters[where]["original_size"] == size and letters[where]["original_sha256"] == sha
        kept = len(letters[where]["original"])
        assert letters[where]["original_truncated"] is (kept < size)
        assert sent[where].kind != "tight" or letters[where]["original_truncated"]
    assert rss_growth < RSS_GROWTH_LIMIT, f"RSS grew by {rss_growth / 2**20:.0f} MiB"
    cut = sum(1 for where in huge if letters[where]["original_truncated"])
    print(
        f"\n{name}: {len(sent)} fuzzed records ({len(huge)} near the limit, {cut} cut to fit): "
        f"{len(mine_dead)} dead-lettered, {len(mine_handled)} handled, "
        f"RSS +{rss_growth / 2**20:.0f} MiB; generated in {generated_s:.0f} s, produced in "
        f"{produced_s:.0f} s, consumed in {consumed_s:.0f} s"
    )
