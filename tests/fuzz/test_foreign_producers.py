"""What other clients' producers write, on the real broker, read by the bus's consumers.

Compression. Kafka clients compress batches with
gzip, snappy, lz4 or zstd (``compression.type``; librdkafka's, as kcat and confluent-kafka use
it, among them); the broker stores a batch as the producer compressed it, so a consumer must
decode every codec. Here confluent-kafka (librdkafka) produces: every codec's records are read
and handled, and a batch whose codec the client cannot decode is dead-lettered record by record
while the consumer goes on (before, one zstd record stopped the training coordinator and left
inference and the compressor not ready).

Transactions. A transactional producer (exactly-once pipelines, Kafka Streams) may abort: its
records stay in the log, marked aborted. The bus reads committed records only, so a job whose
transaction was taken back never runs.
"""

from __future__ import annotations

import uuid

import pytest
from aiokafka.record._crecords import default_records
from confluent_kafka import Producer
from fuzzing import own_topic, read_job_statuses

from maas import events

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

CODECS = ["gzip", "snappy", "lz4", "zstd"]
PER_CODEC = 3  # records in one batch


def produce_compressed(bootstrap: str, topic: str, codec: str, ids: list[str]) -> None:
    """One batch of job statuses, compressed with ``codec`` by librdkafka (it sends a batch
    uncompressed when that is smaller: the reasons repeat, so compressing always wins)."""
    producer = Producer(
        {"bootstrap.servers": bootstrap, "compression.type": codec, "linger.ms": 200}
    )
    try:
        for job_id in ids:
            status = events.new_event(
                events.JOB_STATUS, job_id=job_id, state="queued", reason="waiting for workers " * 50
            )
            producer.produce(topic, value=events.encode(status), key=job_id.encode(), partition=0)
        assert producer.flush(30) == 0, "librdkafka did not deliver every record"
    finally:
        producer.close()


async def test_every_codec_a_librdkafka_producer_uses_is_read(stack):
    topic = await own_topic(stack.settings)
    ids = {codec: [f"{codec}-{i}" for i in range(PER_CODEC)] for codec in CODECS}
    for codec in CODECS:
        produce_compressed(stack.settings.kafka_bootstrap, topic.name, codec, ids[codec])
    handled, letters = await read_job_statuses(stack.settings, topic, PER_CODEC * len(CODECS))
    assert letters == []
    assert handled == [job_id for codec in CODECS for job_id in ids[codec]]


async def test_a_batch_whose_codec_cannot_be_decoded_is_dead_lettered_and_reading_goes_on(
    stack, monkeypatch
):
    topic = await own_topic(stack.settings)
    produce_compressed(stack.settings.kafka_bootstrap, topic.name, "zstd", ["z-0", "z-1"])
    produce_compressed(stack.settings.kafka_bootstrap, topic.name, "gzip", ["g-0"])
    # As a client without the zstd library reads it: aiokafka's batch reader checks this.
    monkeypatch.setattr(default_records.codecs, "has_zstd", lambda: False)
    handled, letters = await read_job_statuses(stack.settings, topic, 3)
    assert handled == ["g-0"]
    assert [letter.offset for letter in letters] == [0, 1]
    assert all("UnsupportedCodecError" in letter.message for letter in letters)


async def test_records_of_an_aborted_transaction_are_never_read(stack):
    topic = await own_topic(stack.settings)
    producer = Producer(
        {
            "bootstrap.servers": stack.settings.kafka_bootstrap,
            "transactional.id": f"foreign-{uuid.uuid4().hex[:8]}",
        }
    )
    try:
        producer.init_transactions(30)
        for job_id, commit in (("taken-back", False), ("kept", True)):
            producer.begin_transaction()
            status = events.new_event(events.JOB_STATUS, job_id=job_id, state="queued")
            producer.produce(topic.name, events.encode(status), job_id.encode(), partition=0)
            if commit:
                producer.commit_transaction(30)
            else:
                producer.flush(30)  # in the log, then taken back
                producer.abort_transaction(30)
    finally:
        producer.close()
    # Offsets: the aborted record, its abort marker, the kept one: read in order, were the
    # aborted one read it would be handled first.
    handled, letters = await read_job_statuses(stack.settings, topic, 1)
    assert (handled, letters) == (["kept"], [])
