"""The event producer outlives a broker that stopped taking its producer id (the Kafka client
is replaced by a fake here: what is under test is what the bus does with its errors)."""

from __future__ import annotations

from typing import Any

import pytest
from aiokafka.errors import KafkaTimeoutError, OutOfOrderSequenceNumber

from maas import bus
from maas.config import Settings
from maas.errors import Unavailable


class FakeProducer:
    """Fails its first ``fail`` sends with ``error``; records what it sent, and its stop."""

    made: list[FakeProducer] = []

    def __init__(self, **_options: Any) -> None:
        self.sent: list[bytes] = []
        self.stopped = False
        self.fail, self.error = 0, Exception
        FakeProducer.made.append(self)

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        self.stopped = True

    async def send_and_wait(self, topic: str, value: bytes, **_options: Any) -> None:
        if self.fail:
            self.fail -= 1
            raise self.error()
        self.sent.append(value)


@pytest.fixture
def producer(monkeypatch: pytest.MonkeyPatch) -> bus.EventProducer:
    FakeProducer.made = []
    monkeypatch.setattr(bus, "AIOKafkaProducer", FakeProducer)
    return bus.EventProducer(Settings())


async def test_a_refused_producer_id_gets_a_new_producer_and_the_retry_goes_through(producer):
    await producer.start()
    (first,) = FakeProducer.made
    first.fail, first.error = 1, OutOfOrderSequenceNumber
    with pytest.raises(Unavailable, match="OutOfOrderSequenceNumber"):
        await producer.send_raw("maas.jobs.v1", b"lost")
    await producer.send_raw("maas.jobs.v1", b"again")
    assert len(FakeProducer.made) == 2 and first.stopped
    assert FakeProducer.made[1].sent == [b"again"]
    await producer.stop()


async def test_an_ordinary_send_failure_keeps_the_producer(producer):
    await producer.start()
    (first,) = FakeProducer.made
    first.fail, first.error = 1, KafkaTimeoutError
    with pytest.raises(Unavailable):
        await producer.send_raw("maas.jobs.v1", b"late")
    await producer.send_raw("maas.jobs.v1", b"again")
    assert FakeProducer.made == [first] and first.sent == [b"again"]
    await producer.stop()
