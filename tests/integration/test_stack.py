"""The local stack against the real broker and S3 server: status, restart keeps data, broker
off/on, the CLI, and the smoke round trip."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
import uuid

import pytest

from infra.smoke import run as smoke
from maas.config import Settings
from maas.store import ALL_BUCKETS, MODELS_BUCKET, minio_client
from maas.topics import ALL_TOPICS

pytestmark = pytest.mark.integration

PROBE_TOPIC = "maas.test-probe"


async def _produce(settings: Settings, value: bytes) -> tuple[int, int]:
    from aiokafka import AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        if PROBE_TOPIC not in await admin.list_topics():
            await admin.create_topics([NewTopic(PROBE_TOPIC, 1, 1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap, acks="all", enable_idempotence=True
    )
    await producer.start()
    try:
        meta = await producer.send_and_wait(PROBE_TOPIC, value, key=b"k")
    finally:
        await producer.stop()
    return meta.partition, meta.offset


async def _read(settings: Settings, partition: int, offset: int) -> bytes:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False
    )
    await consumer.start()
    try:
        tp = TopicPartition(PROBE_TOPIC, partition)
        consumer.assign([tp])
        consumer.seek(tp, offset)
        record = await asyncio.wait_for(consumer.getone(), timeout=30)
    finally:
        await consumer.stop()
    return record.value


async def _topics(settings: Settings) -> dict[str, int]:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        return {t["topic"]: len(t["partitions"]) for t in await admin.describe_topics()}
    finally:
        await admin.close()


def test_bootstrap_created_topics_and_buckets(stack) -> None:  # type: ignore[no-untyped-def]
    topics = asyncio.run(_topics(stack.settings))
    for topic in ALL_TOPICS:
        assert topics.get(topic.name) == topic.partitions, topic.name
    client = minio_client(stack.settings)
    assert {b.name for b in client.list_buckets()} >= set(ALL_BUCKETS)


def test_status_shows_every_component_alive(stack) -> None:  # type: ignore[no-untyped-def]
    rows = {row.name: row for row in stack.local.status()}
    assert set(rows) >= {"kafka", "s3"}
    assert all(row.alive and row.pid for row in rows.values())
    assert rows["s3"].port == int(stack.settings.s3_endpoint.rsplit(":", 1)[1])


def test_smoke_round_trip(stack) -> None:  # type: ignore[no-untyped-def]
    lines = smoke(stack.settings)
    assert lines[0].startswith("kafka ok") and lines[1].startswith("s3 ok")


def test_cli_status_and_config(stack) -> None:  # type: ignore[no-untyped-def]
    # The fixture exported MAAS_*; a subprocess sees the same private stack.
    status = subprocess.run(
        [sys.executable, "-m", "maas.cli", "stack", "--infra-only", "status"],
        capture_output=True,
        text=True,
        env=os.environ,
        check=False,
    )
    assert status.returncode == 0, status.stdout + status.stderr
    assert "kafka" in status.stdout and "healthy" in status.stdout
    config = subprocess.run(
        [sys.executable, "-m", "maas.cli", "config"],
        capture_output=True,
        text=True,
        env=os.environ,
        check=True,
    )
    assert stack.settings.kafka_bootstrap in config.stdout
    assert stack.settings.s3_secret_key not in config.stdout


def test_down_then_up_keeps_records_and_objects(stack) -> None:  # type: ignore[no-untyped-def]
    if not stack.owned:
        pytest.skip("restarting a stack this session did not start")
    settings = stack.settings
    value = f"survives {uuid.uuid4()}".encode()
    partition, offset = asyncio.run(_produce(settings, value))
    key = f"test/{uuid.uuid4()}"
    minio_client(settings).put_object(MODELS_BUCKET, key, io.BytesIO(value), len(value))

    stopped = stack.local.down()
    assert set(stopped) >= {"kafka", "s3"}
    assert not any(row.alive for row in stack.local.status())

    stack.local.up()
    assert all(row.alive for row in stack.local.status())
    assert stack.local.up() is not None  # already up: a no-op, not an error
    assert asyncio.run(_read(settings, partition, offset)) == value
    response = minio_client(settings).get_object(MODELS_BUCKET, key)
    try:
        assert response.read() == value
    finally:
        response.close()
        response.release_conn()


def test_broker_down_then_back(stack) -> None:  # type: ignore[no-untyped-def]
    from infra.kafka import api_versions_ok

    host, port = stack.settings.kafka_bootstrap.rsplit(":", 1)
    with stack.broker_down():
        assert not api_versions_ok(host, int(port))
        assert stack.local.s3.process.alive()
    assert api_versions_ok(host, int(port))
    value = b"after restart"
    partition, offset = asyncio.run(_produce(stack.settings, value))
    assert asyncio.run(_read(stack.settings, partition, offset)) == value
