"""Dead letters: why a record was refused, as a ``maas.dlq/1`` event that always fits the broker.

A record can be refused because it is too big to handle, so its envelope must not simply carry
it: the original value is cut to what fits under the broker's record limit, and its size and
sha256 are kept so the full record can still be identified (it stays in its topic until
retention removes it). Reasons and headers are clipped the same way. Plain functions, no I/O.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from maas import events
from maas.config import Settings

Headers = list[tuple[str, bytes | None]]

# Room left under the limit for Kafka's own batch and record framing (about 100 bytes) and the
# key; generous, because an envelope one byte too big is the failure this module exists to stop.
FRAMING_BYTES = 4096
MAX_KEY_BYTES = 1024
MAX_HEADERS = 32
MAX_HEADER_CHARS = 256
MAX_MESSAGE_CHARS = 2000


@dataclass(frozen=True)
class DeadLetter:
    """Why a record was dead-lettered; ``event`` is set when it did decode."""

    topic: str
    partition: int
    offset: int
    key: str | None
    value: bytes | None
    headers: Headers
    code: str
    message: str
    event: dict[str, Any] | None = None

    @property
    def dlq_key(self) -> str | None:
        """The original key, cut to ``MAX_KEY_BYTES`` (the DLQ has one partition anyway)."""
        if self.key is None:
            return None
        return self.key.encode()[:MAX_KEY_BYTES].decode(errors="ignore")

    def to_event(
        self,
        consumer_group: str,
        max_record_bytes: int = Settings.kafka_max_message_bytes,
    ) -> dict[str, Any]:
        """The ``maas.dlq/1`` event; encoded with ``dlq_key`` it fits ``max_record_bytes``."""
        value = self.value if self.value is not None else b""
        event = events.new_event(
            events.DLQ,
            source_topic=self.topic,
            partition=self.partition,
            offset=self.offset,
            consumer_group=consumer_group,
            reason={"code": self.code, "message": events.clip(self.message, MAX_MESSAGE_CHARS)},
            original=b"",
            original_size=len(value),
            original_sha256=hashlib.sha256(value).hexdigest(),
            original_truncated=False,
            original_headers=_headers_text(self.headers),
        )
        key_bytes = len(self.dlq_key.encode()) if self.dlq_key is not None else 0
        room = max_record_bytes - FRAMING_BYTES - key_bytes - len(events.encode(event))
        # msgpack's bin header grows from 2 to 5 bytes with the length: keep those 5 spare.
        kept = max(0, min(len(value), room - 5))
        event["original"] = value[:kept]
        event["original_truncated"] = kept < len(value)
        return event


def _headers_text(headers: Headers) -> dict[str, str | None]:
    """Headers as text (latin-1 keeps every byte), at most ``MAX_HEADERS``, each clipped."""
    return {
        events.clip(key, MAX_HEADER_CHARS): (
            None if value is None else events.clip(value.decode("latin-1"), MAX_HEADER_CHARS)
        )
        for key, value in headers[:MAX_HEADERS]
    }
