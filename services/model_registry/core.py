"""The registry's metadata: models, versions, aliases and their history, in one SQLite file.

Plain Python (no asyncio, no grpc, no S3): the servicer calls it from one thread, the tests call it
directly. Every write is one ``BEGIN IMMEDIATE`` transaction that also appends the events it
causes to the ``outbox`` table, so an event exists exactly when its change committed; the outbox
relay publishes them later (``outbox.py``).

Version numbers: ``add_version`` is told which number the caller reserved (``next_version``) and
refuses any other, so a version can never be duplicated or skipped even if two callers race; the
service serializes registrations of one model so that race does not happen in practice.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from maas import events
from maas.config import Settings
from maas.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from maas.registry.types import (
    DEFAULT_ALIAS,
    MANIFEST_FILE,
    PRIMARY_METHODS,
    AliasChange,
    ArtifactFile,
    Lineage,
    LineageNode,
    ModelRef,
    ModelSummary,
    ModelVersion,
    artifact_prefix,
    check_alias,
    check_name,
    check_version,
)
from maas.topics import MODELS

SHA256_HEX = frozenset("0123456789abcdef")
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000

# Append-only: a released migration is never edited, a new one is added with the next number.
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
)


@dataclass(frozen=True)
class ManifestInfo:
    """What the registry indexes from a manifest.json (the rest is kept verbatim)."""

    arch: str
    format: str
    files: dict[str, str]  # file name -> sha256 hex
    parent: ModelRef | None
    method: str | None
    job_id: str | None
    metrics: dict[str, float]
    tensors: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {dtype, shape}


@dataclass(frozen=True)
class NewVersion:
    name: str
    manifest_json: bytes
    manifest: ManifestInfo
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


def parse_manifest(
    data: bytes,
    *,
    max_bytes: int = Settings.registry_max_manifest_bytes,
    max_metrics: int = Settings.registry_max_metrics,
) -> ManifestInfo:
    """Validate the parts of a manifest the registry relies on; InvalidArgument names the field."""
    if len(data) > max_bytes:
        raise ResourceExhausted(
            f"manifest_json is {len(data)} bytes; at most {max_bytes} are accepted "
            "(MAAS_REGISTRY_MAX_MANIFEST_BYTES)"
        )
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidArgument(f"manifest_json is not JSON: {events.clip(str(exc), 200)}") from None
    if not isinstance(obj, dict):
        raise InvalidArgument("manifest_json must be a JSON object (maas.artifacts.Manifest)")
    arch, fmt = obj.get("arch"), obj.get("format", "dense")
    if not isinstance(arch, str) or not arch:
        raise InvalidArgument("manifest.arch must be a zoo architecture name, e.g. 'mlp'")
    if not isinstance(fmt, str) or not fmt:
        raise InvalidArgument("manifest.format must be a non-empty string, e.g. 'dense'")
    if not isinstance(obj.get("config", {}), dict):
        raise InvalidArgument("manifest.config must be an object")
    return ManifestInfo(
        arch=arch,
        format=fmt,
        files=_manifest_files(obj.get("files")),
        parent=_manifest_parent(obj.get("parent")),
        method=_optional_text(obj, "method"),
        job_id=_optional_text(obj, "job_id"),
        metrics=_manifest_metrics(obj.get("metrics") or {}, max_metrics),
        tensors=_manifest_tensors(obj.get("tensors") or {}),
    )


def _manifest_files(files: Any) -> dict[str, str]:
    if not isinstance(files, dict) or not files:
        raise InvalidArgument("manifest.files must map at least one file name to its sha256")
    for name, digest in files.items():
        check_name(name, what="artifact file name")
        if name == MANIFEST_FILE:
            raise InvalidArgument(f"manifest.files must not list {MANIFEST_FILE} itself")
        if not isinstance(digest, str) or len(digest) != 64 or not set(digest) <= SHA256_HEX:
            raise InvalidArgument(f"manifest.files[{name!r}] must be a lowercase sha256 hex")
    return dict(files)


def _manifest_parent(parent: Any) -> ModelRef | None:
    if parent is None:
        return None
    if not isinstance(parent, dict) or set(parent) != {"name", "version"}:
        raise InvalidArgument('manifest.parent must be null or {"name": ..., "version": N}')
    return ModelRef(parent["name"], version=check_version(parent["version"]))


def _optional_text(obj: dict[str, Any], key: str) -> str | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise InvalidArgument(f"manifest.{key} must be a string or null")
    return value or None


def _manifest_metrics(metrics: Any, limit: int) -> dict[str, float]:
    if not isinstance(metrics, dict) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in metrics.values()
    ):
        raise InvalidArgument("manifest.metrics must map names to numbers")
    if len(metrics) > limit:
        raise ResourceExhausted(
            f"manifest.metrics has {len(metrics)} entries; at most {limit} are accepted "
            "(MAAS_REGISTRY_MAX_METRICS)"
        )
    try:
        return {str(k): float(v) for k, v in metrics.items()}
    except OverflowError:
        raise InvalidArgument("manifest.metrics holds a number too large for a double") from None


def _manifest_tensors(tensors: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(tensors, dict) or not all(
        isinstance(t, dict)
        and isinstance(t.get("dtype"), str)
        and isinstance(t.get("shape"), list)
        and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in t["shape"])
        for t in tensors.values()
    ):
        raise InvalidArgument(
            'manifest.tensors must map tensor names to {"dtype": "float32", "shape": [3, 4]}'
        )
    return tensors


def page_size_of(requested: int) -> int:
    if requested < 0:
        raise InvalidArgument(f"page_size {requested} is negative; use 0 for the default")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


class RegistryCore:
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
        self._migrate()

    def close(self) -> None:
        with self._lock:
            self._db.close()

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

    def _migrate(self) -> None:
        with self._write() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations "
                "(version INTEGER PRIMARY KEY, applied_ms INTEGER NOT NULL)"
            )
            applied = {r[0] for r in db.execute("SELECT version FROM schema_migrations")}
            newest = MIGRATIONS[-1][0]
            if applied and max(applied) > newest:
                raise FailedPrecondition(
                    f"{self.path} has schema version {max(applied)}, newer than this registry "
                    f"({newest}); run a newer registry or restore a backup"
                )
            for number, statements in MIGRATIONS:
                if number in applied:
                    continue
                for statement in statements:
                    db.execute(statement)
                db.execute("INSERT INTO schema_migrations VALUES (?, ?)", (number, self._clock()))

    def schema_version(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT MAX(version) FROM schema_migrations").fetchone()[0])

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
        """The number the next registration of ``name`` gets (deleted numbers are never reused)."""
        check_name(name)
        with self._lock:
            return self._next_version(self._db, name)

    @staticmethod
    def _next_version(db: sqlite3.Connection, name: str) -> int:
        row = db.execute("SELECT MAX(version) FROM versions WHERE name = ?", (name,)).fetchone()
        return int(row[0] or 0) + 1

    def check_parent(self, parent: ModelRef | None) -> None:
        """NotFound unless ``parent`` is a live version (checked before any upload starts)."""
        if parent is not None:
            with self._lock:
                self._live_row(self._db, parent.name, parent.version or 0, what="parent")

    def add_version(self, new: NewVersion, *, version: int) -> ModelVersion:
        """Record a verified artifact as ``version``, which must be ``next_version(name)``."""
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
            expected = self._next_version(db, name)
            if version != expected:
                raise FailedPrecondition(
                    f"{name}: version {version} is not the next number ({expected}); another "
                    "registration of this model committed first: retry"
                )
            parent = new.manifest.parent
            if parent is not None:
                self._live_row(db, parent.name, parent.version or 0, what="parent")
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
            return self._version_from_row(db, self._live_row(db, name, version))

    def get_version(self, ref: ModelRef, *, as_of_ms: int | None = None) -> ModelVersion:
        with self._lock:
            db = self._db
            if ref.alias is not None:
                version = self._resolve_alias(db, ref.name, ref.alias, as_of_ms)
            elif ref.version is not None:
                version = ref.version
            else:
                version = self._default_version(db, ref.name)
            return self._version_from_row(db, self._live_row(db, ref.name, version))

    def list_versions(
        self, name: str, *, page_size: int = 0, page_token: str = ""
    ) -> tuple[list[ModelVersion], str]:
        """Live versions newest first; the token is the last version number returned."""
        size = page_size_of(page_size)
        below = _int_token(page_token) if page_token else None
        with self._lock:
            db = self._db
            self._require_model(db, name)
            rows = db.execute(
                "SELECT * FROM versions WHERE name = ? AND deleted_ms IS NULL "
                "AND (? IS NULL OR version < ?) ORDER BY version DESC LIMIT ?",
                (name, below, below, size + 1),
            ).fetchall()
            page = [self._version_from_row(db, r) for r in rows[:size]]
        return page, (version_token(page[-1]) if len(rows) > size else "")

    def delete_version(self, name: str, version: int, actor: str) -> ModelVersion:
        """Hide a version for good (its number is not reused); refused while aliased."""
        with self._write() as db:
            row = self._live_row(db, name, version)
            aliases = self._aliases_of(db, name, version)
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
            return self._version_from_row(db, {**dict(row), "deleted_ms": now})

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
                (page_token, size + 1),
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
                    updated_ms=max(r["updated"] or 0, self._last_alias_ms(db, r["name"])),
                )
                for r in rows[:size]
            ]
        return page, (model_token(page[-1]) if len(rows) > size else "")

    # --- aliases -----------------------------------------------------------------------------

    def set_alias(self, name: str, alias: str, version: int, actor: str) -> AliasChange:
        check_alias(alias)
        with self._write() as db:
            self._live_row(db, name, version)
            return self._move_alias(db, name, alias, version, actor, self._clock())

    def delete_alias(self, name: str, alias: str, actor: str) -> AliasChange:
        check_alias(alias)
        with self._write() as db:
            current = self._current_alias(db, name, alias)
            if current is None:
                self._require_model(db, name)
                raise NotFound(f"model {name!r} has no alias {alias!r}")
            now = self._clock()
            db.execute("DELETE FROM aliases WHERE name = ? AND alias = ?", (name, alias))
            change = self._record_move(db, name, alias, current, None, actor, now)
            self._emit(
                db, name, "alias-deleted", alias=alias, previous_version=current, actor=actor
            )
            return change

    def alias_history(self, name: str, alias: str | None = None) -> list[AliasChange]:
        """Every move of ``name``'s aliases (or one alias), oldest first."""
        with self._lock:
            db = self._db
            self._require_model(db, name)
            rows = db.execute(
                "SELECT * FROM alias_history WHERE name = ? AND (? IS NULL OR alias = ?) "
                "ORDER BY id",
                (name, alias, alias),
            ).fetchall()
        return [
            AliasChange(
                r["name"], r["alias"], r["from_version"], r["to_version"], r["actor"], r["ts_ms"]
            )
            for r in rows
        ]

    def _move_alias(
        self, db: sqlite3.Connection, name: str, alias: str, version: int, actor: str, now: int
    ) -> AliasChange:
        previous = self._current_alias(db, name, alias)
        db.execute(
            "INSERT INTO aliases (name, alias, version) VALUES (?, ?, ?) "
            "ON CONFLICT (name, alias) DO UPDATE SET version = excluded.version",
            (name, alias, version),
        )
        change = self._record_move(db, name, alias, previous, version, actor, now)
        self._emit(
            db,
            name,
            "alias-set",
            alias=alias,
            version=version,
            previous_version=previous,
            actor=actor,
        )
        return change

    @staticmethod
    def _record_move(
        db: sqlite3.Connection,
        name: str,
        alias: str,
        from_version: int | None,
        to_version: int | None,
        actor: str,
        now: int,
    ) -> AliasChange:
        db.execute(
            "INSERT INTO alias_history (name, alias, from_version, to_version, actor, ts_ms) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (name, alias, from_version, to_version, actor, now),
        )
        return AliasChange(name, alias, from_version, to_version, actor, now)

    @staticmethod
    def _current_alias(db: sqlite3.Connection, name: str, alias: str) -> int | None:
        row = db.execute(
            "SELECT version FROM aliases WHERE name = ? AND alias = ?", (name, alias)
        ).fetchone()
        return None if row is None else int(row[0])

    def _resolve_alias(
        self, db: sqlite3.Connection, name: str, alias: str, as_of_ms: int | None
    ) -> int:
        if as_of_ms is None:
            version = self._current_alias(db, name, alias)
            if version is None:
                self._require_model(db, name)
                raise NotFound(f"model {name!r} has no alias {alias!r}")
            return version
        row = db.execute(
            "SELECT to_version FROM alias_history WHERE name = ? AND alias = ? AND ts_ms <= ? "
            "ORDER BY id DESC LIMIT 1",
            (name, alias, as_of_ms),
        ).fetchone()
        if row is None or row[0] is None:
            self._require_model(db, name)
            raise NotFound(f"alias {name}@{alias} did not point anywhere at {as_of_ms} ms")
        return int(row[0])

    @staticmethod
    def _aliases_of(db: sqlite3.Connection, name: str, version: int) -> tuple[str, ...]:
        return tuple(
            r[0]
            for r in db.execute(
                "SELECT alias FROM aliases WHERE name = ? AND version = ? ORDER BY alias",
                (name, version),
            )
        )

    @staticmethod
    def _last_alias_ms(db: sqlite3.Connection, name: str) -> int:
        row = db.execute("SELECT MAX(ts_ms) FROM alias_history WHERE name = ?", (name,)).fetchone()
        return int(row[0] or 0)

    # --- lineage -----------------------------------------------------------------------------

    def lineage(self, name: str, version: int) -> Lineage:
        with self._lock:
            db = self._db
            row: sqlite3.Row | None = self._live_row(db, name, version)
            ancestors: list[LineageNode] = []
            seen: set[tuple[str, int]] = set()
            while row is not None and (row["name"], row["version"]) not in seen:
                seen.add((row["name"], row["version"]))
                ancestors.append(_node(row))
                row = db.execute(
                    "SELECT * FROM versions WHERE name = ? AND version = ?",
                    (row["parent_name"], row["parent_version"]),
                ).fetchone()
            children = db.execute(
                "SELECT * FROM versions WHERE parent_name = ? AND parent_version = ? "
                "ORDER BY name, version",
                (name, version),
            ).fetchall()
        return Lineage(tuple(ancestors), tuple(_node(r) for r in children))

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

    # --- rows --------------------------------------------------------------------------------

    def _require_model(self, db: sqlite3.Connection, name: str) -> None:
        check_name(name)
        if db.execute("SELECT 1 FROM models WHERE name = ?", (name,)).fetchone() is None:
            raise NotFound(f"model {name!r} is not registered")

    def _default_version(self, db: sqlite3.Connection, name: str) -> int:
        """A bare name: the ``production`` alias, else the newest primary (unpromoted
        compressed variants are never picked; see ``PRIMARY_METHODS``)."""
        promoted = self._current_alias(db, name, DEFAULT_ALIAS)
        if promoted is not None:
            return promoted
        self._require_model(db, name)
        marks = ",".join("?" * len(PRIMARY_METHODS))
        row = db.execute(
            "SELECT MAX(version) FROM versions WHERE name = ? AND deleted_ms IS NULL "
            f"AND (method IS NULL OR method IN ({marks}))",
            (name, *PRIMARY_METHODS),
        ).fetchone()
        if row[0] is not None:
            return int(row[0])
        variants = db.execute(
            "SELECT COUNT(*) FROM versions WHERE name = ? AND deleted_ms IS NULL", (name,)
        ).fetchone()[0]
        if not variants:
            raise NotFound(f"model {name!r} has no versions left (all were deleted)")
        raise NotFound(
            f"model {name!r} has only compressed variants and no {DEFAULT_ALIAS!r} alias; name "
            f"one ({name}@VERSION) or promote it: maas models alias {name} VERSION "
            f"{DEFAULT_ALIAS}"
        )

    def _live_row(
        self, db: sqlite3.Connection, name: str, version: int, *, what: str = "model"
    ) -> sqlite3.Row:
        check_name(name)
        row = db.execute(
            "SELECT * FROM versions WHERE name = ? AND version = ?", (name, version)
        ).fetchone()
        if row is None:
            self._require_model(db, name)
            raise NotFound(f"{what} {name!r} has no version {version}")
        if row["deleted_ms"] is not None:
            raise NotFound(f"{what} {name}@{version} was deleted")
        return row  # type: ignore[no-any-return]

    def _version_from_row(self, db: sqlite3.Connection, row: Any) -> ModelVersion:
        parent = (
            ModelRef(row["parent_name"], version=row["parent_version"])
            if row["parent_name"] is not None
            else None
        )
        return ModelVersion(
            name=row["name"],
            version=row["version"],
            arch=row["arch"],
            format=row["format"],
            manifest_json=bytes(row["manifest_json"]),
            manifest_sha256=row["manifest_sha256"],
            files=tuple(ArtifactFile(**f) for f in json.loads(row["files_json"])),
            bucket=row["bucket"],
            prefix=row["prefix"],
            parent=parent,
            method=row["method"],
            job_id=row["job_id"],
            metrics=json.loads(row["metrics_json"]),
            aliases=self._aliases_of(db, row["name"], row["version"]),
            created_ms=row["created_ms"],
            created_by=row["created_by"],
            size_bytes=row["size_bytes"],
            deleted_ms=row["deleted_ms"],
        )


def _node(row: sqlite3.Row) -> LineageNode:
    return LineageNode(
        row["name"],
        row["version"],
        row["method"],
        row["job_id"],
        row["created_ms"],
        row["deleted_ms"] is not None,
    )


def version_token(last: ModelVersion) -> str:
    """The page token that continues a version listing after ``last``."""
    return str(last.version)


def model_token(last: ModelSummary) -> str:
    """The page token that continues a model listing after ``last``."""
    return last.name


def _int_token(token: str) -> int:
    if not token.isascii() or not token.isdigit() or len(token) > 18:
        raise InvalidArgument(
            f"page_token {events.clip(repr(token), 40)} is not one this server issued"
        )
    return int(token)
