"""Reads over the registry's SQLite connection, shared by ``SqliteStore``'s operations.

Each function takes the connection the caller holds (inside the store's lock or one of its
write transactions), so a read inside a write sees that write's own changes.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from maas.errors import NotFound
from maas.names import check_name
from maas.registry.types import (
    DEFAULT_ALIAS,
    PRIMARY_METHODS,
    WEIGHT_TOTAL,
    AliasTargets,
    ArtifactFile,
    Lineage,
    LineageNode,
    ModelRef,
    ModelVersion,
    PolicyVersion,
)
from maas.suggest import closest


def next_version(db: sqlite3.Connection, name: str) -> int:
    row = db.execute("SELECT MAX(version) FROM versions WHERE name = ?", (name,)).fetchone()
    return int(row[0] or 0) + 1


def require_model(db: sqlite3.Connection, name: str) -> None:
    check_name(name)
    if db.execute("SELECT 1 FROM models WHERE name = ?", (name,)).fetchone() is None:
        raise NotFound(f"model {name!r} is not registered{_model_hint(db, name)}")


# Names compared for a "did you mean": of a similar length, and not all of a large registry
# (an edit distance a name; a caller may ask for unknown names as often as it likes).
SUGGEST_AMONG = 200


def _model_hint(db: sqlite3.Connection, name: str) -> str:
    rows = db.execute(
        "SELECT name FROM models WHERE length(name) BETWEEN ? AND ? LIMIT ?",
        (len(name) - 2, len(name) + 2, SUGGEST_AMONG),
    ).fetchall()
    guess = closest(name, [row[0] for row in rows])
    return f"; did you mean {guess!r}?" if guess else "; `maas models list` shows the models"


def missing_alias(db: sqlite3.Connection, name: str, alias: str) -> NotFound:
    """NotFound for an alias ``name`` does not have (the model's own NotFound if it has no
    model), naming the aliases it has or the one meant."""
    require_model(db, name)
    rows = db.execute("SELECT alias FROM aliases WHERE name = ? ORDER BY alias", (name,))
    aliases = [row[0] for row in rows.fetchall()]
    guess = closest(alias, aliases)
    if guess is not None:
        hint = f"did you mean {guess!r}?"
    else:
        hint = f"its aliases: {', '.join(aliases)}" if aliases else "it has no aliases"
    return NotFound(f"model {name!r} has no alias {alias!r}; {hint}")


def live_row(
    db: sqlite3.Connection, name: str, version: int, *, what: str = "model"
) -> sqlite3.Row:
    check_name(name)
    row = db.execute(
        "SELECT * FROM versions WHERE name = ? AND version = ?", (name, version)
    ).fetchone()
    if row is None:
        require_model(db, name)
        raise NotFound(f"{what} {name!r} has no version {version}")
    if row["deleted_ms"] is not None:
        raise NotFound(f"{what} {name}@{version} was deleted")
    return row  # type: ignore[no-any-return]


def current_alias(db: sqlite3.Connection, name: str, alias: str) -> int | None:
    row = db.execute(
        "SELECT version FROM aliases WHERE name = ? AND alias = ?", (name, alias)
    ).fetchone()
    return None if row is None else int(row[0])


def resolve_alias(db: sqlite3.Connection, name: str, alias: str, as_of_ms: int | None) -> int:
    if as_of_ms is None:
        version = current_alias(db, name, alias)
        if version is None:
            raise missing_alias(db, name, alias)
        return version
    row = db.execute(
        "SELECT to_version FROM alias_history WHERE name = ? AND alias = ? AND ts_ms <= ? "
        "ORDER BY id DESC LIMIT 1",
        (name, alias, as_of_ms),
    ).fetchone()
    if row is None or row[0] is None:
        require_model(db, name)
        raise NotFound(f"alias {name}@{alias} did not point anywhere at {as_of_ms} ms")
    return int(row[0])


def default_version(db: sqlite3.Connection, name: str) -> int:
    """A bare name: the ``production`` alias, else the newest primary (unpromoted compressed
    variants are never picked; see ``PRIMARY_METHODS``)."""
    promoted = current_alias(db, name, DEFAULT_ALIAS)
    if promoted is not None:
        return promoted
    require_model(db, name)
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


def aliases_of(db: sqlite3.Connection, name: str, version: int) -> tuple[str, ...]:
    """Every alias sending traffic to ``name@version``, wholly or as one target of a split."""
    return tuple(
        r[0]
        for r in db.execute(
            "SELECT alias FROM aliases WHERE name = ? AND version = ? UNION "
            "SELECT alias FROM alias_targets WHERE name = ? AND version = ? ORDER BY alias",
            (name, version, name, version),
        )
    )


def alias_targets(db: sqlite3.Connection, name: str, alias: str) -> AliasTargets:
    """Where ``alias`` sends traffic: its split, or its one version at weight 100."""
    split = tuple(
        (int(r[0]), int(r[1]))
        for r in db.execute(
            "SELECT version, weight FROM alias_targets WHERE name = ? AND alias = ? "
            "ORDER BY weight DESC, version",
            (name, alias),
        )
    )
    return split or ((resolve_alias(db, name, alias, None), WEIGHT_TOTAL),)


def policy(db: sqlite3.Connection, name: str, version: int | None) -> PolicyVersion:
    """``name``'s current policy, or its policy ``version``; NotFound when there is none."""
    number = version or policy_version(db, name)
    row = db.execute(
        "SELECT * FROM policies WHERE name = ? AND version = ?", (name, number)
    ).fetchone()
    if row is None:
        if version:
            raise NotFound(f"model {name!r} has no policy version {version}")
        raise NotFound(
            f"model {name!r} has no policy; set one: maas models policy set {name} FILE.yaml"
        )
    return PolicyVersion(
        name, row["version"], json.loads(row["document_json"]), row["actor"], row["created_ms"]
    )


def policy_version(db: sqlite3.Connection, name: str) -> int:
    """The newest policy version of ``name`` (0: none yet)."""
    row = db.execute("SELECT MAX(version) FROM policies WHERE name = ?", (name,)).fetchone()
    return int(row[0] or 0)


def last_alias_ms(db: sqlite3.Connection, name: str) -> int:
    row = db.execute("SELECT MAX(ts_ms) FROM alias_history WHERE name = ?", (name,)).fetchone()
    return int(row[0] or 0)


def version_from_row(db: sqlite3.Connection, row: Any) -> ModelVersion:
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
        aliases=aliases_of(db, row["name"], row["version"]),
        created_ms=row["created_ms"],
        created_by=row["created_by"],
        size_bytes=row["size_bytes"],
        deleted_ms=row["deleted_ms"],
    )


def lineage_node(row: sqlite3.Row) -> LineageNode:
    return LineageNode(
        row["name"],
        row["version"],
        row["method"],
        row["job_id"],
        row["created_ms"],
        row["deleted_ms"] is not None,
    )


def lineage(db: sqlite3.Connection, name: str, version: int) -> Lineage:
    """``name@version`` and its ancestors, newest first, and its children (NotFound unless
    it is live)."""
    row: sqlite3.Row | None = live_row(db, name, version)
    ancestors: list[LineageNode] = []
    seen: set[tuple[str, int]] = set()
    while row is not None and (row["name"], row["version"]) not in seen:
        seen.add((row["name"], row["version"]))
        ancestors.append(lineage_node(row))
        row = db.execute(
            "SELECT * FROM versions WHERE name = ? AND version = ?",
            (row["parent_name"], row["parent_version"]),
        ).fetchone()
    children = db.execute(
        "SELECT * FROM versions WHERE parent_name = ? AND parent_version = ? "
        "ORDER BY name, version",
        (name, version),
    ).fetchall()
    return Lineage(tuple(ancestors), tuple(lineage_node(r) for r in children))
