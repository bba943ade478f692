"""Liveness: a background loop that dies is reported (gauge, reason, health hook), not hidden."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from maas.bus import ConsumerDied
from maas.liveness import Liveness


def up(registry: CollectorRegistry, loop: str) -> float | None:
    return registry.get_sample_value("maas_loop_up", {"loop": loop})


async def test_a_loop_that_dies_turns_the_gauge_off_and_tells_the_health_hook_why():
    registry = CollectorRegistry()
    told: list[str | None] = []

    async def health(why: str | None) -> None:
        told.append(why)

    liveness = Liveness(registry, on_change=health)
    started = asyncio.Event()

    async def consumer() -> None:
        started.set()
        await asyncio.sleep(0)
        raise ConsumerDied("could not write to maas.dlq.v1 8 times in a row")

    task = asyncio.create_task(liveness.supervise("jobs-consumer", consumer()))
    await started.wait()
    async with asyncio.timeout(10):
        while not told:
            await asyncio.sleep(0.01)
    assert up(registry, "jobs-consumer") == 0
    assert told == ["jobs-consumer: could not write to maas.dlq.v1 8 times in a row"]
    assert not liveness.healthy and not task.done()  # the process stays up, saying why
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_loop_that_is_stopped_is_not_a_failure():
    registry = CollectorRegistry()
    liveness = Liveness(registry)

    async def consumer() -> None:
        return None

    await liveness.supervise("models-consumer", consumer())
    assert liveness.healthy and liveness.reason is None
    assert up(registry, "models-consumer") == 1


async def test_an_unexpected_exception_is_reported_with_its_type():
    liveness = Liveness()

    async def relay() -> None:
        raise KeyError("outbox")

    task = asyncio.create_task(liveness.supervise("outbox-relay", relay()))
    async with asyncio.timeout(10):
        while liveness.healthy:
            await asyncio.sleep(0.01)
    assert liveness.reason == "outbox-relay: KeyError: 'outbox'"
    task.cancel()
