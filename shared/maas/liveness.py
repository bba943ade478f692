"""Liveness of a service's background loops: health and metrics say when one died, and why.

Every service runs loops beside its request handling (the bus's consumers, the registry's outbox
relay). A loop that dies must not leave the service answering SERVING while it does no work,
nor kill the process into a restart loop on the same record: ``Liveness.supervise`` reports it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from prometheus_client import CollectorRegistry, Gauge

from maas import events
from maas.errors import MaasError

log = logging.getLogger(__name__)

HealthHook = Callable[[str | None], Awaitable[None]]


class Liveness:
    """Which of a service's background loops still run; one that died says why.

    ``supervise`` runs a loop (a consumer's ``run``, a relay): when it ends on an error, the
    gauge ``maas_loop_up{loop}`` drops to 0, the reason is logged and kept in ``failures``, and
    ``on_change`` gets the reasons (the service turns its health NOT_SERVING). The process stays
    up, saying why it does no work, instead of dying in a restart loop.
    """

    def __init__(
        self, registry: CollectorRegistry | None = None, *, on_change: HealthHook | None = None
    ) -> None:
        self.failures: dict[str, str] = {}
        self._on_change = on_change
        self._up = Gauge(
            "maas_loop_up",
            "1 while the named background loop runs, 0 once it stopped on an error",
            ["loop"],
            registry=CollectorRegistry() if registry is None else registry,
        )

    @property
    def healthy(self) -> bool:
        return not self.failures

    @property
    def reason(self) -> str | None:
        """Why the service is unhealthy, or None."""
        return "; ".join(f"{name}: {why}" for name, why in self.failures.items()) or None

    async def supervise(self, name: str, loop: Awaitable[None]) -> None:
        """Await ``loop``; if it fails, report it and wait (until cancelled) instead of raising."""
        self._up.labels(name).set(1)
        try:
            await loop
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            why = exc.message if isinstance(exc, MaasError) else f"{type(exc).__name__}: {exc}"
            log.error("%s stopped: %s", name, why, exc_info=not isinstance(exc, MaasError))
            self.failures[name] = events.clip(why)
        self._up.labels(name).set(0)
        if self._on_change is not None:
            await self._on_change(self.reason)
        await asyncio.Event().wait()
