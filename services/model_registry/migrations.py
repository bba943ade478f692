"""The registry's SQLite schema: numbered migrations, applied in order inside one transaction.

Append-only: a released migration is never edited; a change to the schema is a new migration
with the next number. A database written by a newer registry is refused rather than guessed at.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

from maas.errors import FailedPrecondition

MIGRATIONS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (
        1,
        (
            """CREATE TABLE models (
            name TEXT PRIMARY KEY,
            created_ms INTEGER NOT NULL
        )""",
            """CREATE TABLE versions (
            name TEXT NOT NULL REFERENCES models(name),
            version INTEGER NOT NULL CHECK (version >= 1),
            arch TEXT NOT NULL,
            format TEXT NOT NULL,
            manifest_json BLOB NOT NULL,
            manifest_sha256 TEXT NOT NULL,
            files_json TEXT NOT NULL,
            bucket TEXT NOT NULL,
            prefix TEXT NOT NULL,
            parent_name TEXT,
            parent_version INTEGER,
            method TEXT,
            job_id TEXT,
            metrics_json TEXT NOT NULL,
            size_bytes INTEGER NOT NULL,
            created_ms INTEGER NOT NULL,
            created_by TEXT NOT NULL,
            deleted_ms INTEGER,
            deleted_by TEXT,
            PRIMARY KEY (name, version)
        )""",
            "CREATE INDEX versions_by_parent ON versions(parent_name, parent_version)",
            """CREATE TABLE aliases (
            name TEXT NOT NULL,
            alias TEXT NOT NULL,
            version INTEGER NOT NULL,
            PRIMARY KEY (name, alias),
            FOREIGN KEY (name, version) REFERENCES versions(name, version)
        )""",
            """CREATE TABLE alias_history (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            name TEXT NOT NULL,
            alias TEXT NOT NULL,
            from_version INTEGER,
            to_version INTEGER,
            actor TEXT NOT NULL,
            ts_ms INTEGER NOT NULL
        )""",
            "CREATE INDEX alias_history_by_alias ON alias_history(name, alias, ts_ms)",
            """CREATE TABLE outbox (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            topic TEXT NOT NULL,
            key TEXT NOT NULL,
            event_json TEXT NOT NULL,
            created_ms INTEGER NOT NULL,
            sent_ms INTEGER
        )""",
            "CREATE INDEX outbox_pending ON outbox(id) WHERE sent_ms IS NULL",
        ),
    ),
    (
        2,
        (
            # Why an alias moved (the promoter's rule, an operator's note); "" before this.
            "ALTER TABLE alias_history ADD COLUMN reason TEXT NOT NULL DEFAULT ''",
            # A model's policies, every version kept; a name may get one before its first
            # version, so no reference to models.
            """CREATE TABLE policies (
            name TEXT NOT NULL,
            version INTEGER NOT NULL CHECK (version >= 1),
            document_json TEXT NOT NULL,
            actor TEXT NOT NULL,
            created_ms INTEGER NOT NULL,
            PRIMARY KEY (name, version)
        )""",
        ),
    ),
    (
        3,
        (
            # A weighted alias (canary, A/B): every target with its percent; aliases.version
            # stays the heaviest. No rows: the alias sends everything to aliases.version.
            """CREATE TABLE alias_targets (
            name TEXT NOT NULL,
            alias TEXT NOT NULL,
            version INTEGER NOT NULL,
            weight INTEGER NOT NULL CHECK (weight BETWEEN 1 AND 100),
            PRIMARY KEY (name, alias, version),
            FOREIGN KEY (name, version) REFERENCES versions(name, version)
        )""",
            "CREATE INDEX alias_targets_by_version ON alias_targets(name, version)",
            # The split a move made, as [[version, weight], ...]; "" for a single version.
            "ALTER TABLE alias_history ADD COLUMN targets_json TEXT NOT NULL DEFAULT ''",
        ),
    ),
)


def migrate(db: sqlite3.Connection, path: Path, clock: Callable[[], int]) -> None:
    """Bring ``db`` (at ``path``, named in errors) to the newest schema; call inside a write."""
    db.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations "
        "(version INTEGER PRIMARY KEY, applied_ms INTEGER NOT NULL)"
    )
    applied = {r[0] for r in db.execute("SELECT version FROM schema_migrations")}
    newest = MIGRATIONS[-1][0]
    if applied and max(applied) > newest:
        raise FailedPrecondition(
            f"{path} has schema version {max(applied)}, newer than this registry "
            f"({newest}); run a newer registry or restore a backup"
        )
    for number, statements in MIGRATIONS:
        if number in applied:
            continue
        for statement in statements:
            db.execute(statement)
        db.execute("INSERT INTO schema_migrations VALUES (?, ?)", (number, clock()))


def schema_version(db: sqlite3.Connection) -> int:
    return int(db.execute("SELECT MAX(version) FROM schema_migrations").fetchone()[0])
