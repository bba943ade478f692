"""Readiness: whether the parts a service works through (Kafka, S3, the registry) answer it now.

``/healthz`` says whether the process works (``maas.liveness``): an orchestrator restarts it
when not. A broker or S3 outage is no reason to restart anything (the services retry and carry
on once it ends), so it stays out of liveness. It used to stay out of sight too: every health
check said SERVING through a 90-s S3 outage while no job could start and no model load.
``Dependencies`` checks each dependency every few seconds in the background; ``/readyz`` answers
503 ``NOT_READY: kafka: <why>`` while one does not answer, the gauge
``maas_dependency_up{dependency}`` says the same to Prometheus, and the log says when it went
away and when it came back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import urllib3
from prometheus_client import CollectorRegistry, Gauge

from maas import events
from maas.bus import EventProducer
from maas.config import Settings
from maas.errors import MaasError
from maas.store import MODELS_BUCKET, minio_client

log = logging.getLogger(__name__)

Check = Callable[[], Awaitable[None]]  # returns if the dependency answered; raises why not

CHECK_EVERY_S = 5.0
# A check that has not answered in this long failed: a frozen broker or S3 accepts connections
# and never answers, and the clients' own timeouts (30 s and more) are for work, not for this.
CHECK_TIMEOUT_S = 5.0
# Failed checks in a row before a dependency counts as away: one slow answer on a loaded
# machine is not an outage.
FAILURES_TO_DOWN = 2


@dataclass(slots=True)
class _State:
    failures: int = 0  # failed checks in a row
    why: str = ""  # the last failure's reason
    down_since: float | None = None  # monotonic; None while it counts as answering


class Dependencies:
    """Named checks of what a service needs, run every ``period_s`` (``watch``); ``reason``
    says which ones do not answer and why (None: all do)."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        period_s: float = CHECK_EVERY_S,
        timeout_s: float = CHECK_TIMEOUT_S,
        failures_to_down: int = FAILURES_TO_DOWN,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._checks: dict[str, Check] = {}
        self._states: dict[str, _State] = {}
        self._period_s = period_s
        self._timeout_s = timeout_s
        self._failures_to_down = failures_to_down
        self._clock = clock
        self._up = Gauge(
            "maas_dependency_up",
            "1 while the named dependency (kafka, s3, registry) answers the service's checks, 0 "
            "while not",
            ["dependency"],
            registry=CollectorRegistry() if registry is None else registry,
        )

    def add_kafka_and_s3(self, producer: EventProducer, settings: Settings) -> None:
        """What every service works through: Kafka (checked through ``producer``) and S3."""
        self.add("kafka", producer.ping)
        self.add("s3", s3_check(settings))

    def add(self, name: str, check: Check) -> None:
        self._checks[name] = check
        self._states[name] = _State()
        self._up.labels(name).set(1)

    @property
    def ready(self) -> bool:
        return self.reason is None

    @property
    def reason(self) -> str | None:
        """Which dependencies do not answer, each with why and for how long; None if all do."""
        now = self._clock()
        away = [
            f"{name}: {state.why} (for {now - state.down_since:.0f} s)"
            for name, state in self._states.items()
            if state.down_since is not None
        ]
        return "; ".join(away) or None

    async def watch(self) -> None:
        """Check every dependency every ``period_s``, until cancelled."""
        while True:
            await self.check_all()
            await asyncio.sleep(self._period_s)

    async def check_all(self) -> None:
        """Run every check once, concurrently, and note each outcome."""
        names = list(self._checks)
        outcomes = await asyncio.gather(*(self._check(name) for name in names))
        for name, why in zip(names, outcomes, strict=True):
            self._note(name, why)

    async def _check(self, name: str) -> str | None:
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._checks[name]()
        except TimeoutError:
            return f"no answer in {self._timeout_s:.0f} s"
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # whatever the client raised is the reason
            return exc.message if isinstance(exc, MaasError) else f"{type(exc).__name__}: {exc}"
        return None

    def _note(self, name: str, why: str | None) -> None:
        state = self._states[name]
        if why is None:
            if state.down_since is not None:
                log.warning(
                    "%s answers again, after %.0f s away", name, self._clock() - state.down_since
                )
                self._up.labels(name).set(1)
            self._states[name] = _State()
            return
        state.failures += 1
        state.why = events.clip(why, 300)
        if state.down_since is None and state.failures >= self._failures_to_down:
            state.down_since = self._clock()
            self._up.labels(name).set(0)
            log.warning(
                "%s does not answer: %s (the service is not ready until it does)", name, why
            )


def s3_check(settings: Settings, bucket: str = MODELS_BUCKET) -> Check:
    """A check that S3 answers an authenticated request about ``bucket`` (which must exist).
    It has its own one-connection client, without retries and with short timeouts, so a frozen
    S3 ties up no thread the service works with and no thread for longer than a check."""
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(total=CHECK_TIMEOUT_S),
        maxsize=1,
        retries=False,
    )
    client = minio_client(settings, http)

    def head_bucket() -> None:
        try:
            exists = client.bucket_exists(bucket)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            cause = getattr(exc, "reason", None) or exc  # urllib3 wraps the socket's error
            raise MaasError(f"S3 at {settings.s3_endpoint}: {cause}") from exc
        if not exists:
            raise MaasError(f"bucket {bucket} does not exist (maas stack up creates it)")

    async def check() -> None:
        await asyncio.to_thread(head_bucket)

    return check
