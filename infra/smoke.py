"""Smoke round trip against whatever MAAS_* points at: one Kafka record and one S3 object.

    python -m infra.smoke      (or `maas smoke`)

Kafka: produce a unique record to `maas.smoke` (created here, 1 partition; not a platform topic so
no service ever consumes it) with acks=all + idempotence, then read it back from its offset.
S3: put a 12 MiB object in 5 MiB parts (multipart upload, SigV4), get it back, compare, delete.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import sys
import time
import uuid

from maas.config import Settings
from maas.errors import FailedPrecondition
from maas.kafka_security import kafka_client_kwargs

SMOKE_TOPIC = "maas.smoke"


async def kafka_round_trip(settings: Settings) -> str:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka_bootstrap, **kafka_client_kwargs(settings)
    )
    await admin.start()
    try:
        if SMOKE_TOPIC not in await admin.list_topics():
            await admin.create_topics([NewTopic(SMOKE_TOPIC, 1, 1)])
    finally:
        await admin.close()

    value = f"smoke {uuid.uuid4()}".encode()
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap,
        acks="all",
        enable_idempotence=True,
        **kafka_client_kwargs(settings),
    )
    await producer.start()
    try:
        meta = await producer.send_and_wait(SMOKE_TOPIC, value, key=b"smoke")
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        enable_auto_commit=False,
        **kafka_client_kwargs(settings),
    )
    await consumer.start()
    try:
        tp = TopicPartition(SMOKE_TOPIC, meta.partition)
        consumer.assign([tp])
        consumer.seek(tp, meta.offset)
        async with asyncio.timeout(30):
            record = await consumer.getone()
    finally:
        await consumer.stop()
    if record.value != value:
        raise FailedPrecondition(f"Kafka smoke: read back {record.value!r}, expected {value!r}")
    return f"kafka ok: {SMOKE_TOPIC}[{meta.partition}]@{meta.offset}"


def s3_round_trip(settings: Settings) -> str:
    from maas.store import DATASETS_BUCKET, minio_client

    client = minio_client(settings)
    if not client.bucket_exists(DATASETS_BUCKET):
        raise FailedPrecondition(
            f"bucket {DATASETS_BUCKET} is missing; run python -m infra.bootstrap"
        )
    payload = os.urandom(12 * 1024 * 1024)
    key = f"smoke/{uuid.uuid4()}.bin"
    client.put_object(
        DATASETS_BUCKET, key, io.BytesIO(payload), len(payload), part_size=5 * 1024 * 1024
    )
    response = client.get_object(DATASETS_BUCKET, key)
    try:
        got = response.read()
    finally:
        response.close()
        response.release_conn()
    client.remove_object(DATASETS_BUCKET, key)
    if hashlib.sha256(got).digest() != hashlib.sha256(payload).digest():
        raise FailedPrecondition(f"S3 smoke: object {key} came back different ({len(got)} bytes)")
    return f"s3 ok: {len(payload)} bytes multipart put+get in {DATASETS_BUCKET}"


def run(settings: Settings) -> list[str]:
    from aiokafka.errors import KafkaError

    from maas.bus import unreachable

    try:
        kafka = asyncio.run(kafka_round_trip(settings))
    except KafkaError as exc:
        raise unreachable(settings, exc) from None
    return [kafka, s3_round_trip(settings)]


def main() -> int:
    started = time.monotonic()
    for line in run(Settings.from_env()):
        print(line)
    print(f"smoke passed in {time.monotonic() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
