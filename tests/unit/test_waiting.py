"""maas.waiting: a timed wait that says whether its event came, and never swallows a stop."""

from __future__ import annotations

import asyncio

from maas.waiting import set_within


async def test_an_event_set_in_time_is_reported() -> None:
    event = asyncio.Event()
    asyncio.get_running_loop().call_later(0.01, event.set)
    assert await set_within(event, 30) is True


async def test_an_event_not_set_in_time_is_reported_as_such() -> None:
    assert await set_within(asyncio.Event(), 0.01) is False


async def test_a_cancellation_arriving_with_the_event_ends_the_waiting_loop() -> None:
    """The event is set and the waiter cancelled before it runs again: the loop must end there,
    not take the event and go round (what asyncio.wait_for did on Python 3.11)."""
    wake = asyncio.Event()
    rounds = 0

    async def wait_in_a_loop() -> None:
        nonlocal rounds
        while rounds < 3:
            await set_within(wake, 30)
            wake.clear()
            rounds += 1

    waiter = asyncio.create_task(wait_in_a_loop())
    for _ in range(3):
        await asyncio.sleep(0)  # the waiter is parked on the event
    wake.set()  # the waiter is woken, but has not run yet
    waiter.cancel()
    await asyncio.wait({waiter}, timeout=5)
    running_on = not waiter.done()
    waiter.cancel()  # a loop that ran on would be waiting again
    assert not running_on
    assert waiter.cancelled()
    assert rounds == 0
