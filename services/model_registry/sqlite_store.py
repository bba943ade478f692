"""The registry's metadata in one SQLite file (WAL): the ``RegistryStore`` backend.

Thread-safe; every method is one transaction. Writes take ``BEGIN IMMEDIATE`` and append the
events they cause to the ``outbox`` table in the same transaction (see ``store.py``).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from maas import events
from maas.errors import FailedPrecondition, InvalidArgument
from maas.names import check_alias, check_name
from maas.registry.types import (
    AliasChange,
    AliasTargets,
    Lineage,
    ModelRef,
    ModelSummary,
    ModelVersion,
    PolicyVersion,
    artifact_prefix,
    check_targets,
)
from maas.topics import MODELS
from services.model_registry import migrations
from services.model_registry import sqlite_aliases as aliases
from services.model_registry import sqlite_reads as reads
from services.model_registry.store import (
    NewVersion,
    OutboxEntry,
    check_reason,
    history_start,
    history_token,
    int_token,
    model_token,
    models_after,
    page_size_of,
    parent_of,
    version_token,
)


class SqliteStore:
    """Registry metadata over SQLite (WAL). Thread-safe; every method is one transaction."""

    def __init__(self, path: str | Path, *, clock: Callable[[], int] = events.now_ms) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._clock = clock
        self._lock = threading.RLock()
        # Autocommit mode: transactions are explicit (BEGIN IMMEDIATE takes the write lock up
        # front, so two writers never both read "next version = 4").
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a registration acknowledged to a client survives a power cut, not just a crash.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA busy_timeout=10000")
        with self._write() as db:
            migrations.migrate(db, self.path, self._clock)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def schema_version(self) -> int:
        with self._lock:
            return migrations.schema_version(self._db)

    # --- plumbing ----------------------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _emit(self, db: sqlite3.Connection, name: str, kind: str, **fields: Any) -> None:
        event = events.new_event(
            events.MODEL,
            event=kind,
            name=name,
            **{k: v for k, v in fields.items() if v is not None},
        )
        events.validate(event)  # a bad event fails its transaction, never the relay later
        db.execute(
            "INSERT INTO outbox (topic, key, event_json, created_ms) VALUES (?, ?, ?, ?)",
            (MODELS.name, name, json.dumps(event), event["ts"]),
        )

    # --- versions ----------------------------------------------------------------------------

    def next_version(self, name: str) -> int:
        check_name(name)
        with self._lock:
            return reads.next_version(self._db, name)

    def check_parent(self, parent: ModelRef | None) -> None:
        if parent is not None:
            with self._lock:
                reads.live_row(self._db, parent.name, parent.version or 0, what="parent")

    def add_version(self, new: NewVersion, *, version: int) -> ModelVersion:
        name = check_name(new.name)
        if new.alias is not None:
            check_alias(new.alias)
        missing = set(new.manifest.files) - set(new.file_sizes)
        if missing:
            raise FailedPrecondition(f"{name}: no stored size for files {sorted(missing)}")
        files = [
            {"name": f, "sha256": digest, "size_bytes": new.file_sizes[f]}
            for f, digest in sorted(new.manifest.files.items())
        ]
        now = self._clock()
        with self._write() as db:
            expected = reads.next_version(db, name)
            if version != expected:
                raise FailedPrecondition(
                    f"{name}: version {version} is not the next number ({expected}); another "
                    "registration of this model committed first: retry"
                )
            parent = parent_of(new.manifest)
            if parent is not None:
                reads.live_row(db, parent.name, parent.version or 0, what="parent")
            db.execute("INSERT OR IGNORE INTO models (name, created_ms) VALUES (?, ?)", (name, now))
            db.execute(
                "INSERT INTO versions (name, version, arch, format, manifest_json, "
                "manifest_sha256, files_json, bucket, prefix, parent_name, parent_version, "
                "method, job_id, metrics_json, size_bytes, created_ms, created_by) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    name,
                    version,
                    new.manifest.arch,
                    new.manifest.format,
                    new.manifest_json,
                    hashlib.sha256(new.manifest_json).hexdigest(),
                    json.dumps(files),
                    new.bucket,
                    artifact_prefix(name, version),
                    parent.name if parent else None,
                    parent.version if parent else None,
                    new.manifest.method,
                    new.manifest.job_id,
                    json.dumps(new.manifest.metrics),
                    sum(new.file_sizes.values()) + len(new.manifest_json),
                    now,
                    new.actor,
                ),
            )
            self._emit(
                db, name, "registered", version=version, job_id=new.manifest.job_id, actor=new.actor
            )
            if new.alias is not None:
                self._move_alias(db, name, new.alias, version, new.actor, now)
            return reads.version_from_row(db, reads.live_row(db, name, version))

    def get_version(self, ref: ModelRef, *, as_of_ms: int | None = None) -> ModelVersion:
        if as_of_ms is not None and ref.alias is None:
            raise InvalidArgument(
                f"as_of_ms={as_of_ms} applies only to an alias ref (name@alias), not to "
                f"'{ref}': leave it at 0"
            )
        with self._lock:
            db = self._db
            if ref.alias is not None:
                version = reads.resolve_alias(db, ref.name, ref.alias, as_of_ms)
            elif ref.version is not None:
                version = ref.version
            else:
                version = reads.default_version(db, ref.name)
            return reads.version_from_row(db, reads.live_row(db, ref.name, version))

    def list_versions(
        self, name: str, *, page_size: int = 0, page_token: str = ""
    ) -> tuple[list[ModelVersion], str]:
        """Live versions newest first; the token is the last version number returned."""
        size = page_size_of(page_size)
        below = int_token(page_token) if page_token else None
        with self._lock:
            db = self._db
            reads.require_model(db, name)
            rows = db.execute(
                "SELECT * FROM versions WHERE name = ? AND deleted_ms IS NULL "
                "AND (? IS NULL OR version < ?) ORDER BY version DESC LIMIT ?",
                (name, below, below, size + 1),
            ).fetchall()
            page = [reads.version_from_row(db, r) for r in rows[:size]]
        return page, (version_token(page[-1]) if len(rows) > size else "")

    def delete_version(self, name: str, version: int, actor: str) -> ModelVersion:
        with self._write() as db:
            row = reads.live_row(db, name, version)
            aliases = reads.aliases_of(db, name, version)
            if aliases:
                raise FailedPrecondition(
                    f"{name}@{version} is what {', '.join(aliases)} point(s) at; move or delete "
                    "those aliases first"
                )
            now = self._clock()
            db.execute(
                "UPDATE versions SET deleted_ms = ?, deleted_by = ? WHERE name = ? AND version = ?",
                (now, actor, name, version),
            )
            self._emit(db, name, "deleted", version=version, actor=actor)
            return reads.version_from_row(db, {**dict(row), "deleted_ms": now})

    # --- models ------------------------------------------------------------------------------

    def list_models(
        self, *, page_size: int = 0, page_token: str = ""
    ) -> tuple[list[ModelSummary], str]:
        """Models by name; the token is the last name returned."""
        size = page_size_of(page_size)
        with self._lock:
            db = self._db
            rows = db.execute(
                "SELECT m.name, m.created_ms, "
                "MAX(CASE WHEN v.deleted_ms IS NULL THEN v.version END) AS latest, "
                "COUNT(v.version) - COUNT(v.deleted_ms) AS live, "
                "MAX(v.created_ms) AS updated FROM models m "
                "LEFT JOIN versions v ON v.name = m.name WHERE m.name > ? "
                "GROUP BY m.name ORDER BY m.name LIMIT ?",
                (models_after(page_token), size + 1),
            ).fetchall()
            page = [
                ModelSummary(
                    name=r["name"],
                    latest_version=r["latest"],
                    version_count=int(r["live"]),
                    aliases={
                        a["alias"]: a["version"]
                        for a in db.execute(
                            "SELECT alias, version FROM aliases WHERE name = ? ORDER BY alias",
                            (r["name"],),
                        )
                    },
                    created_ms=r["created_ms"],
                    updated_ms=max(r["updated"] or 0, reads.last_alias_ms(db, r["name"])),
                )
                for r in rows[:size]
            ]
        return page, (model_token(page[-1]) if len(rows) > size else "")

    # --- aliases -----------------------------------------------------------------------------

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
        """Point ``alias`` at ``version``, or split it over ``targets`` (checked; the heaviest
        becomes ``version``)."""
        check_alias(alias)
        reason = check_reason(reason)
        if targets:
            targets = check_targets(targets)
            version = targets[0][0]
            targets = () if len(targets) == 1 else targets
        with self._write() as db:
            for number in {version, *(v for v, _ in targets)}:
                reads.live_row(db, name, number)
            return self._move_alias(db, name, alias, version, actor, self._clock(), reason, targets)

    def alias_targets(self, name: str, alias: str) -> AliasTargets:
        check_alias(alias)
        with self._lock:
            return reads.alias_targets(self._db, name, alias)

    def delete_alias(self, name: str, alias: str, actor: str) -> AliasChange:
        check_alias(alias)
        with self._write() as db:
            current = reads.current_alias(db, name, alias)
            if current is None:
                raise reads.missing_alias(db, name, alias)
            now = self._clock()
            db.execute("DELETE FROM aliases WHERE name = ? AND alias = ?", (name, alias))
            db.execute("DELETE FROM alias_targets WHERE name = ? AND alias = ?", (name, alias))
            change = aliases.record(db, AliasChange(name, alias, current, None, actor, now))
            self._emit(
                db, name, "alias-deleted", alias=alias, previous_version=current, actor=actor
            )
            return change

    def alias_history(
        self, name: str, alias: str | None = None, *, page_size: int = 0, page_token: str = ""
    ) -> tuple[list[AliasChange], str]:
        """Oldest first; the token counts the moves before the next page (rows are never
        removed, so it stays valid)."""
        if alias:
            check_alias(alias)
        size = page_size_of(page_size)
        start = history_start(page_token)
        with self._lock:
            db = self._db
            reads.require_model(db, name)
            rows = db.execute(
                "SELECT * FROM alias_history WHERE name = ? AND (? IS NULL OR alias = ?) "
                "ORDER BY id LIMIT ? OFFSET ?",
                (name, alias, alias, size + 1, start),
            ).fetchall()
        page = [aliases.change_from_row(r) for r in rows[:size]]
        return page, (history_token(start + size) if len(rows) > size else "")

    def _move_alias(
        self,
        db: sqlite3.Connection,
        name: str,
        alias: str,
        version: int,
        actor: str,
        now: int,
        reason: str = "",
        targets: AliasTargets = (),
    ) -> AliasChange:
        previous = reads.current_alias(db, name, alias)
        aliases.point(db, name, alias, version, targets)
        change = AliasChange(name, alias, previous, version, actor, now, reason, targets)
        self._emit(
            db,
            name,
            "alias-set",
            alias=alias,
            version=version,
            previous_version=previous,
            actor=actor,
            reason=reason or None,
            targets=[{"version": v, "weight": w} for v, w in targets] or None,
        )
        return aliases.record(db, change)

    # --- policies ----------------------------------------------------------------------------

    def set_policy(self, name: str, document: dict[str, Any], actor: str) -> PolicyVersion:
        check_name(name)
        now = self._clock()
        with self._write() as db:
            version = reads.policy_version(db, name) + 1
            db.execute(
                "INSERT INTO policies (name, version, document_json, actor, created_ms) "
                "VALUES (?, ?, ?, ?, ?)",
                (name, version, json.dumps(document, sort_keys=True), actor, now),
            )
        return PolicyVersion(name, version, document, actor, now)

    def get_policy(self, name: str, version: int | None = None) -> PolicyVersion:
        check_name(name)
        with self._lock:
            return reads.policy(self._db, name, version)

    # --- lineage -----------------------------------------------------------------------------

    def lineage(self, name: str, version: int) -> Lineage:
        with self._lock:
            return reads.lineage(self._db, name, version)

    # --- outbox ------------------------------------------------------------------------------

    def pending_events(self, limit: int = 100) -> list[OutboxEntry]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, topic, key, event_json FROM outbox WHERE sent_ms IS NULL "
                "ORDER BY id LIMIT ?",
                (limit,),
            ).fetchall()
        return [OutboxEntry(r[0], r[1], r[2], json.loads(r[3])) for r in rows]

    def mark_sent(self, ids: list[int]) -> None:
        now = self._clock()
        with self._write() as db:
            db.executemany("UPDATE outbox SET sent_ms = ? WHERE id = ?", [(now, i) for i in ids])
