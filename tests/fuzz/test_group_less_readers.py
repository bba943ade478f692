"""The readers without a consumer group — every worker's and shard's ``AssignmentReader`` on the
control topic, the coordinator's ``PartitionReader`` of job statuses — read the same hostile
records as the groups (``test_consumers``'s generator) on the real broker. They dead-letter
nothing (the topic's group does): what cannot be read is skipped, no record raises out of the
reader (which would end its loop), and the valid record after them is read.

MAAS_FUZZ_RECORDS sets the count per topic (CI: 200; the issue's figure: 2000).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from test_consumers import RECORDS, TEMPLATES, generate, generate_for, produce

from maas import events, topics
from maas.bus import EventProducer
from maas.bus_reader import PartitionReader
from maas.config import Settings
from maas.store_async import AsyncObjectStore
from maas.topics import Topic
from maas.training.control import ASSIGNED, AssignmentReader, Identity, assignment_event
from maas.training.pool import Assignment
from maas.training.storage import TrainingStore

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

READ_TIMEOUT_S = 600.0


@pytest.fixture
async def training_store(stack) -> AsyncIterator[TrainingStore]:
    objects = AsyncObjectStore(stack.settings)
    await objects.start()
    yield TrainingStore(objects)
    await objects.stop()


async def send(settings: Settings, topic: Topic, event: dict[str, Any], key: str) -> None:
    async with EventProducer(settings, client_id="fuzz-readers") as producer:
        await producer.send(topic, event, key=key)


async def test_a_members_assignment_reader_survives_every_fuzzed_control_record(
    stack, training_store
):
    settings = stack.settings
    identity = Identity(f"fuzz-reader-{uuid.uuid4().hex[:8]}", "worker")
    reader = AssignmentReader(settings, training_store, "fuzz-reader", identity)
    await reader.start()
    try:
        fuzzed = generate_for("training-control", settings.kafka_max_message_bytes, RECORDS)
        await produce(settings, topics.TRAINING_CONTROL.name, fuzzed)
        valid = Assignment(
            job_id=f"fuzz-valid-{uuid.uuid4().hex[:8]}",
            epoch=3,
            workers={0: "fuzz-worker"},
            shards={0: "fuzz-shard"},
            addresses={0: "127.0.0.1:1"},
        )
        # One partition: once the valid assignment is read, every fuzzed record was.
        await send(settings, topics.TRAINING_CONTROL, assignment_event(valid, ASSIGNED), "v")
        read: list[Assignment] = []
        deadline = time.monotonic() + READ_TIMEOUT_S
        while valid not in read:
            assert time.monotonic() < deadline, "the valid assignment was never read"
            read += [assignment for _state, assignment in await reader.next_batch()]
    finally:
        await reader.stop()


async def test_the_coordinators_status_reader_survives_every_fuzzed_status(stack):
    settings = stack.settings
    async with PartitionReader(settings, topics.JOB_STATUS, client_id="fuzz-status") as reader:
        await reader.from_now()
        template = TEMPLATES["job-status"]
        fuzzed = generate(template, settings.kafka_max_message_bytes, RECORDS)
        await produce(settings, topics.JOB_STATUS.name, fuzzed)
        job_id = f"fuzz-valid-{uuid.uuid4().hex[:8]}"
        await send(settings, topics.JOB_STATUS, dict(template, job_id=job_id), job_id)
        end = await reader.end_offsets()
        read = []
        deadline = time.monotonic() + READ_TIMEOUT_S
        while not await reader.reached(end):  # as the coordinator's progress watcher reads
            assert time.monotonic() < deadline, "the reader did not reach the end in time"
            read += await reader.next_records([events.JOB_STATUS], timeout_ms=500)
        assert job_id in {record.event["job_id"] for record in read}
        assert len(read) < len(fuzzed), "no fuzzed record was skipped: the generator lost its teeth"
        print(f"\njob-status: {len(fuzzed)} fuzzed records, {len(read)} read as statuses")
