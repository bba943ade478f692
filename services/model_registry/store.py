"""The registry's metadata store: what the service asks of it, whatever keeps the records.

Models, versions, aliases and their history, lineage, and the outbox of events each change
causes. Every write is one transaction that also appends its events to the outbox, so an event
exists exactly when its change committed; the outbox relay publishes them later (``outbox.py``).
Plain Python (no asyncio, no grpc, no S3): the service calls a store from one thread.
``SqliteStore`` (``sqlite_store.py``) is the one backend.

Version numbers: ``add_version`` is told which number the caller reserved (``next_version``) and
refuses any other, so a version can never be duplicated or skipped even if two callers race; the
service serializes registrations of one model so that race does not happen in practice.

Page tokens are what the last item of a page says about where the next starts (a version
number, a model name; for the alias history, which only grows, how many moves came before);
the servicer trims pages to its reply size with the same functions.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Protocol

from maas.errors import InvalidArgument
from maas.events import clip
from maas.manifest import Manifest
from maas.names import check_name
from maas.registry.types import (
    AliasChange,
    AliasTargets,
    Lineage,
    ModelRef,
    ModelSummary,
    ModelVersion,
    PolicyVersion,
)

DEFAULT_PAGE_SIZE = 100
MAX_REASON_CHARS = 500
MAX_PAGE_SIZE = 1000


@dataclass(frozen=True)
class NewVersion:
    name: str
    manifest_json: bytes  # kept verbatim
    manifest: Manifest  # what parse_manifest made of it
    bucket: str
    file_sizes: dict[str, int]  # every file of the manifest, as stored
    actor: str
    alias: str | None = None


@dataclass(frozen=True)
class OutboxEntry:
    id: int
    topic: str
    key: str
    event: dict[str, Any]


class RegistryStore(Protocol):
    def close(self) -> None: ...

    def schema_version(self) -> int: ...

    # versions
    def next_version(self, name: str) -> int:
        """The number the next registration of ``name`` gets (deleted numbers are never reused)."""
        ...

    def check_parent(self, parent: ModelRef | None) -> None:
        """NotFound unless ``parent`` is a live version (checked before any upload starts)."""
        ...

    def add_version(self, new: NewVersion, *, version: int) -> ModelVersion:
        """Record a verified artifact as ``version``, which must be ``next_version(name)``."""
        ...

    def get_version(self, ref: ModelRef, *, as_of_ms: int | None = None) -> ModelVersion: ...

    def list_versions(
        self, name: str, *, page_size: int = 0, page_token: str = ""
    ) -> tuple[list[ModelVersion], str]:
        """Live versions newest first, and the token of the next page ("" after the last)."""
        ...

    def delete_version(self, name: str, version: int, actor: str) -> ModelVersion:
        """Hide a version for good (its number is not reused); refused while aliased."""
        ...

    # models
    def list_models(
        self, *, page_size: int = 0, page_token: str = ""
    ) -> tuple[list[ModelSummary], str]:
        """Models by name, and the token of the next page ("" after the last)."""
        ...

    # aliases
    def set_alias(
        self,
        name: str,
        alias: str,
        version: int,
        actor: str,
        reason: str = "",
        *,
        targets: AliasTargets = (),
    ) -> AliasChange:
        """Point ``alias`` at ``version``, or split it by weight over ``targets``."""
        ...

    def alias_targets(self, name: str, alias: str) -> AliasTargets:
        """Where ``alias`` sends traffic, heaviest first (one target of 100 when not split)."""
        ...

    def delete_alias(self, name: str, alias: str, actor: str) -> AliasChange: ...

    def alias_history(
        self, name: str, alias: str | None = None, *, page_size: int = 0, page_token: str = ""
    ) -> tuple[list[AliasChange], str]:
        """Moves of ``name``'s aliases (or one alias), oldest first, and the token of the next
        page ("" after the last)."""
        ...

    # policies
    def set_policy(self, name: str, document: dict[str, Any], actor: str) -> PolicyVersion:
        """Store an already checked policy document as ``name``'s next policy version."""
        ...

    def get_policy(self, name: str, version: int | None = None) -> PolicyVersion:
        """The current policy of ``name`` (or an earlier ``version``); NotFound if none."""
        ...

    # lineage
    def lineage(self, name: str, version: int) -> Lineage: ...

    # outbox
    def pending_events(self, limit: int = 100) -> list[OutboxEntry]: ...

    def mark_sent(self, ids: list[int]) -> None: ...


def parent_of(manifest: Manifest) -> ModelRef | None:
    """The version a manifest names as its parent, as a reference."""
    parent = manifest.parent
    return None if parent is None else ModelRef(parent["name"], version=parent["version"])


def check_reason(reason: str) -> str:
    """An alias move's reason as stored: at most MAX_REASON_CHARS characters of text."""
    if len(reason) > MAX_REASON_CHARS:
        raise InvalidArgument(
            f"reason has {len(reason)} characters; at most {MAX_REASON_CHARS} are kept"
        )
    return reason


def page_size_of(requested: int) -> int:
    if requested < 0:
        raise InvalidArgument(f"page_size {requested} is negative; use 0 for the default")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def version_token(last: ModelVersion) -> str:
    """The page token that continues a version listing after ``last``."""
    return str(last.version)


MODEL_TOKEN_PREFIX = "after:"


def model_token(last: ModelSummary) -> str:
    """The page token that continues a model listing after ``last``."""
    return MODEL_TOKEN_PREFIX + last.name


def models_after(token: str) -> str:
    """The name a model page token continues after ("" for none); InvalidArgument for a token
    this server did not issue (a bare name would silently skip every model before it)."""
    if not token:
        return ""
    name = token[len(MODEL_TOKEN_PREFIX) :]
    with contextlib.suppress(InvalidArgument):
        if token.startswith(MODEL_TOKEN_PREFIX):
            check_name(name)
            return name
    raise InvalidArgument(f"page_token {clip(repr(token), 40)} is not one this server issued")


def history_token(position: int) -> str:
    """The page token that continues an alias history after its first ``position`` moves."""
    return str(position)


def history_start(token: str) -> int:
    """How many moves a history page token skips (0 for none)."""
    return int_token(token) if token else 0


def int_token(token: str) -> int:
    """The number in a page token this server issued; InvalidArgument for any other."""
    if not token.isascii() or not token.isdigit() or len(token) > 18:
        raise InvalidArgument(f"page_token {clip(repr(token), 40)} is not one this server issued")
    return int(token)
