"""Which topics exist on the broker, as a writer that must never wait for a missing one asks.

Topics are never created on first write, so a send to a missing topic would wait for it in vain:
a writer checks each output topic first. A topic found missing is looked up again at most once
every ``TOPICS_REFRESH_S`` (a flood of requests naming one missing topic costs one look-up a
second), while a topic nobody asked about yet is looked up at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable

from maas import events
from maas.errors import NotFound

TOPICS_REFRESH_S = 1.0  # a topic found missing is looked up again at most this often
TOPIC_APPEARS_S = 3.0  # how long a just-created topic may take to reach the broker's metadata
MISSING_TOPICS_KEPT = 1024

ListTopics = Callable[[], Awaitable[Iterable[str]]]


class KnownTopics:
    """The broker's topics as last listed by ``list_topics``, refreshed on a miss."""

    def __init__(self, list_topics: ListTopics) -> None:
        self._list_topics = list_topics
        self._known: set[str] = set()
        self._missing_since: dict[str, float] = {}  # when each topic was last found missing
        self._lock = asyncio.Lock()

    async def require(self, topics: Iterable[str]) -> None:
        """NotFound for the first of ``topics`` the broker lacks."""
        loop = asyncio.get_running_loop()
        for topic in topics:
            if topic in self._known:
                continue
            async with self._lock:  # one look-up at a time; the others then see it
                missed_at = self._missing_since.get(topic, float("-inf"))
                if topic not in self._known and loop.time() - missed_at >= TOPICS_REFRESH_S:
                    await self._look_up(topic)
            if topic not in self._known:
                raise NotFound(
                    f"topic {events.clip(topic, 250)!r} does not exist on the broker; "
                    "name an existing topic (they are never created on first write)"
                )

    def forget(self, topics: Iterable[str]) -> None:
        """Look ``topics`` up again at their next ``require``: a write to one failed, and a
        topic deleted since it was listed is still in the known set."""
        self._known.difference_update(topics)

    async def _look_up(self, topic: str) -> None:
        """Refresh the known topics; a topic created a moment ago may take a while to show in
        the broker's metadata, so a miss looks again for up to ``TOPIC_APPEARS_S``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + TOPIC_APPEARS_S
        while True:
            self._known = set(await self._list_topics())
            if topic in self._known:
                self._missing_since.pop(topic, None)
                return
            if loop.time() >= deadline:
                if len(self._missing_since) >= MISSING_TOPICS_KEPT:
                    self._missing_since.clear()  # bounded: names come from requests
                self._missing_since[topic] = loop.time()
                return
            await asyncio.sleep(TOPIC_APPEARS_S / 10)
