"""Stand-ins shared by the training pool's unit tests: a producer that keeps what it is given,
a clock that moves on each time it is read, a worker's link to one shard address, and a shard's
job held for a checkpoint."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest

from maas import events
from maas.config import Settings
from maas.training.broadcast import ShardParams
from services.gradient_worker.link import ShardLink, Unreachable


class SentEvents:
    """An ``EventProducer`` stand-in: every event sent, in order."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    async def send(self, topic: object, event: dict[str, Any], key: str) -> None:
        self.sent.append(event)


def ticking_clock(monkeypatch: pytest.MonkeyPatch, tick_ms: int) -> list[int]:
    """``events.now_ms`` moves ``tick_ms`` on at each read; the list holds the time now."""
    now = [0]

    def tick() -> int:
        now[0] += tick_ms
        return now[0]

    monkeypatch.setattr(events, "now_ms", tick)
    return now


def link_to(
    address: str | Callable[[int], str],
    settings: Settings,
    on_unreachable: Unreachable | None = None,
    on_params: Callable[[int, ShardParams], None] = lambda shard, params: None,
) -> ShardLink:
    """Rank 0's link to partition 0 (4 values) of job ``j``, served at ``address`` (or where
    ``address(partition)`` says at each dial)."""
    return ShardLink(
        job_id="j",
        worker=0,
        member="w-0",
        shard=0,
        partition_size=4,
        settings=settings,
        address=address if callable(address) else (lambda partition: address),
        on_params=on_params,
        on_unreachable=on_unreachable,
    )


def held_job(partition: int) -> Any:
    """A shard's job (as StatusReporter reads it) at version 61, waiting for a checkpoint past
    the durable version 20."""
    return SimpleNamespace(
        job_id="j",
        plan=SimpleNamespace(target_version=400),
        partition=partition,
        durable_version=20,
        core=SimpleNamespace(version=61),
    )
