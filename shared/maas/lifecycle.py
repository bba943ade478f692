"""How every service process lives and dies: logging from settings, SIGTERM/SIGINT turned into
a stop event, and a main loop that ends either on that event or on its own crash.

A service's ``__main__`` stays three lines: settings from env, build, ``run_until_signalled``.
Shutdown (stop accepting, drain, close) belongs in the service's own ``finally``.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from maas.config import Settings

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(level=settings.log_level.upper(), format=LOG_FORMAT)


def limit_compute_threads(threads: int) -> None:
    """Cap the thread pools of what this process computes with: torch's intra-op threads (if
    torch is loaded) and the BLAS/OpenMP pools numpy and scipy use. Call it after the service's
    imports. Several such processes share a host's cores; a pool wider than its share spins
    waiting for threads the scheduler gave to a neighbour (a 0.1 ms ``saxpy`` took 14 ms so)."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=threads)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)


def run_until_signalled(serve: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run ``serve(stop)`` on a fresh event loop; SIGTERM and SIGINT set ``stop``."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(stop)

    asyncio.run(main())


async def run_until_stopped(work: Coroutine[Any, Any, None], stop: asyncio.Event) -> None:
    """Run ``work`` until ``stop`` is set; a crash of ``work`` propagates (the process exits
    with its error instead of idling). On stop, ``work`` is cancelled and awaited."""
    running = asyncio.create_task(work)
    stopping = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait([running, stopping], return_when=asyncio.FIRST_COMPLETED)
        if running in done:
            running.result()  # a loop that ends on its own has crashed
    finally:
        stopping.cancel()
        running.cancel()
        await asyncio.gather(running, stopping, return_exceptions=True)
