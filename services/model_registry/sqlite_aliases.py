"""Alias writes over the registry's SQLite connection, shared by ``SqliteStore``'s operations.

Each function runs inside the caller's write transaction; the caller emits the event.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from maas.registry.types import AliasChange, AliasTargets


def point(
    db: sqlite3.Connection, name: str, alias: str, version: int, targets: AliasTargets
) -> None:
    """``alias`` now sends its traffic to ``version``, or split over ``targets`` (heaviest =
    ``version``)."""
    db.execute(
        "INSERT INTO aliases (name, alias, version) VALUES (?, ?, ?) "
        "ON CONFLICT (name, alias) DO UPDATE SET version = excluded.version",
        (name, alias, version),
    )
    db.execute("DELETE FROM alias_targets WHERE name = ? AND alias = ?", (name, alias))
    db.executemany(
        "INSERT INTO alias_targets (name, alias, version, weight) VALUES (?, ?, ?, ?)",
        [(name, alias, v, w) for v, w in targets],
    )


def record(db: sqlite3.Connection, change: AliasChange) -> AliasChange:
    """Append ``change`` to the alias history."""
    db.execute(
        "INSERT INTO alias_history "
        "(name, alias, from_version, to_version, actor, ts_ms, reason, targets_json) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            change.name,
            change.alias,
            change.from_version,
            change.to_version,
            change.actor,
            change.ts_ms,
            change.reason,
            json.dumps(change.targets) if change.targets else "",
        ),
    )
    return change


def change_from_row(row: Any) -> AliasChange:
    targets = tuple((int(v), int(w)) for v, w in json.loads(row["targets_json"] or "[]"))
    return AliasChange(
        row["name"],
        row["alias"],
        row["from_version"],
        row["to_version"],
        row["actor"],
        row["ts_ms"],
        row["reason"],
        targets,
    )
