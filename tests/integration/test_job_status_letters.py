"""A job status no reader can read is dead-lettered, not dropped without a trace (DESIGN: a bad
event goes to the DLQ with the reason). Every reader of ``maas.job-status.v1`` is group-less
(the coordinator's progress watch, ``maas jobs watch``) and skips it; the coordinator's
``maas-job-status`` group is the one that dead-letters it. The coordinator runs in-process on
the real broker."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import pytest

from maas import events, topics
from maas.bus import EventProducer
from maas.bus_reader import PartitionReader
from services.aggregator.coordinator import STATUS_GROUP_ID, Coordinator

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

WAIT_S = 120.0
RESEND_S = 2.0  # the group starts at the end: a record sent before it has a position is not its


async def test_the_coordinator_dead_letters_a_job_status_it_cannot_read(stack):
    settings = stack.settings
    key = f"unreadable-status-{uuid.uuid4().hex[:8]}"
    letters = PartitionReader(settings, topics.DLQ, client_id="status-letters-test")
    coordinator = Coordinator(settings)
    await letters.start()
    await letters.from_now()
    await coordinator.start()
    running = asyncio.create_task(coordinator.run())
    try:
        async with EventProducer(settings, client_id=key) as producer:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + WAIT_S
            found: list[dict] = []
            while not found and loop.time() < deadline:
                assert not running.done(), f"the coordinator ended: {running.exception()!r}"
                await producer.send_raw(topics.JOB_STATUS, b"\xc1 is no msgpack", key=key)
                sent_at = loop.time()
                while not found and loop.time() < sent_at + RESEND_S:
                    found = [
                        record.event
                        for record in await letters.next_records([events.DLQ], 500)
                        if record.event["consumer_group"] == STATUS_GROUP_ID and record.key == key
                    ]
        assert found, "no dead letter for the unreadable status"
        assert found[0]["source_topic"] == topics.JOB_STATUS.name
        assert found[0]["reason"]["code"] == "schema_violation"
        assert found[0]["original"] == b"\xc1 is no msgpack"
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
        await coordinator.stop()
        await letters.stop()
