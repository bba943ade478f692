"""Timed waits that keep the waiting task's cancellation.

On Python 3.11 ``asyncio.wait_for`` drops a cancellation that reaches it in the same moment as
the awaited result: it returns the result (or raises its error) instead, and a loop that was
told to stop runs on (a gradient worker's link dialled on for a job it had left; 3.12 rebuilt
``wait_for`` on ``asyncio.timeout``). ``asyncio.timeout`` awaits in the caller's own task, so
such a cancellation is delivered at that task's next await. ruff bans ``asyncio.wait_for``
outside tests (TID251); timed waits use ``asyncio.timeout`` or ``set_within``.
"""

from __future__ import annotations

import asyncio


async def set_within(event: asyncio.Event, seconds: float) -> bool:
    """Wait up to ``seconds`` for ``event``: True once it is set, False when the time ran out.
    A sleep that ends early on a stop or wake-up signal."""
    try:
        async with asyncio.timeout(seconds):
            await event.wait()
    except TimeoutError:
        return False
    return True
