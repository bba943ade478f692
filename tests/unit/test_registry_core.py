"""The registry's SQLite store: numbering, aliases and their history, lineage, outbox, restarts."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from pathlib import Path

import pytest

from maas import events
from maas.errors import FailedPrecondition, InvalidArgument, NotFound
from maas.manifest import parse_manifest
from maas.registry.types import ModelRef
from services.model_registry.migrations import MIGRATIONS
from services.model_registry.sqlite_store import SqliteStore
from services.model_registry.store import NewVersion


class Clock:
    def __init__(self) -> None:
        self.now = 1_000

    def __call__(self) -> int:
        self.now += 10
        return self.now


def manifest_json(
    *, parent: dict | None = None, job_id: str | None = None, weights: bytes = b"weights"
) -> bytes:
    return json.dumps(
        {
            "arch": "mlp",
            "config": {"hidden": [8]},
            "format": "dense",
            "files": {"weights.safetensors": hashlib.sha256(weights).hexdigest()},
            "parent": parent,
            "method": "train" if parent is None else "finetune",
            "job_id": job_id,
            "metrics": {"accuracy": 0.9},
            "settings": {},
        }
    ).encode()


def new_version(name: str = "digits", *, alias: str | None = None, **manifest_args) -> NewVersion:
    data = manifest_json(**manifest_args)
    return NewVersion(
        name=name,
        manifest_json=data,
        manifest=parse_manifest(data),
        bucket="maas-models",
        file_sizes={"weights.safetensors": 7},
        actor="alice",
        alias=alias,
    )


def register(core: SqliteStore, name: str = "digits", **kwargs) -> int:
    version = core.next_version(name)
    return core.add_version(new_version(name, **kwargs), version=version).version


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def core(tmp_path: Path, clock: Clock) -> SqliteStore:
    core = SqliteStore(tmp_path / "registry.db", clock=clock)
    yield core
    core.close()


def event_kinds(core: SqliteStore) -> list[tuple[str, str, int | None]]:
    return [
        (e.event["event"], e.event.get("alias", ""), e.event.get("version"))
        for e in core.pending_events()
    ]


# --- numbering -----------------------------------------------------------------------------------


def test_versions_of_a_model_are_numbered_from_one(core: SqliteStore) -> None:
    assert [register(core) for _ in range(3)] == [1, 2, 3]
    assert register(core, "other") == 1


def test_a_version_number_other_than_the_next_is_refused(core: SqliteStore) -> None:
    register(core)
    with pytest.raises(FailedPrecondition, match="not the next number"):
        core.add_version(new_version(), version=1)
    with pytest.raises(FailedPrecondition, match="not the next number"):
        core.add_version(new_version(), version=3)
    assert core.next_version("digits") == 2


def test_racing_writers_of_one_number_never_duplicate_it(core: SqliteStore) -> None:
    results: list[object] = []

    def attempt() -> None:
        try:
            results.append(core.add_version(new_version(), version=1).version)
        except FailedPrecondition as exc:
            results.append(exc)

    threads = [threading.Thread(target=attempt) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(1) == 1
    assert sum(isinstance(r, FailedPrecondition) for r in results) == 19


def test_deleted_numbers_are_not_reused(core: SqliteStore) -> None:
    register(core)
    register(core)
    core.delete_version("digits", 2, "bob")
    assert register(core) == 3


# --- reading -------------------------------------------------------------------------------------


def test_a_version_records_its_manifest_files_and_lineage(core: SqliteStore) -> None:
    register(core, job_id="job-1")
    v = core.get_version(ModelRef("digits", version=1))
    assert (v.name, v.version, v.arch, v.format, v.method, v.job_id) == (
        "digits",
        1,
        "mlp",
        "dense",
        "train",
        "job-1",
    )
    assert v.prefix == "digits/1/" and v.bucket == "maas-models"
    assert [f.name for f in v.files] == ["weights.safetensors"]
    assert v.manifest_sha256 == hashlib.sha256(v.manifest_json).hexdigest()
    assert v.metrics == {"accuracy": 0.9}
    assert v.created_by == "alice"


def test_no_selector_means_the_latest_live_version(core: SqliteStore) -> None:
    register(core)
    register(core)
    assert core.get_version(ModelRef("digits")).version == 2
    core.delete_version("digits", 2, "bob")
    assert core.get_version(ModelRef("digits")).version == 1


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        (ModelRef("nope"), "model 'nope' is not registered"),
        (ModelRef("digits", version=9), "model 'digits' has no version 9"),
        (ModelRef("digits", alias="production"), "model 'digits' has no alias 'production'"),
        (ModelRef("nope", alias="production"), "model 'nope' is not registered"),
    ],
)
def test_unknown_things_are_not_found_by_name(
    core: SqliteStore, ref: ModelRef, message: str
) -> None:
    register(core)
    with pytest.raises(NotFound, match=message):
        core.get_version(ref)


def test_a_mistyped_model_name_is_told_the_name_it_nearly_is(core: SqliteStore) -> None:
    register(core)
    with pytest.raises(NotFound, match="model 'digts' is not registered; did you mean 'digits'"):
        core.get_version(ModelRef("digts"))


def test_a_name_like_no_model_is_told_where_the_models_are_listed(core: SqliteStore) -> None:
    register(core)
    with pytest.raises(NotFound, match="`maas models list` shows the models"):
        core.get_version(ModelRef("something-else-entirely"))


def test_a_mistyped_alias_is_told_the_alias_it_nearly_is(core: SqliteStore) -> None:
    register(core)
    core.set_alias("digits", "production", 1, "alice")
    with pytest.raises(NotFound, match="no alias 'prodution'; did you mean 'production'"):
        core.get_version(ModelRef("digits", alias="prodution"))
    with pytest.raises(NotFound, match="no alias 'canary'; its aliases: production"):
        core.delete_alias("digits", "canary", "alice")


def test_a_deleted_version_is_not_found(core: SqliteStore) -> None:
    register(core)
    register(core)
    core.delete_version("digits", 1, "bob")
    with pytest.raises(NotFound, match="digits@1 was deleted"):
        core.get_version(ModelRef("digits", version=1))


def test_versions_are_listed_newest_first_in_pages(core: SqliteStore) -> None:
    for _ in range(5):
        register(core)
    core.delete_version("digits", 4, "bob")
    page, token = core.list_versions("digits", page_size=2)
    assert [v.version for v in page] == [5, 3] and token
    page, token = core.list_versions("digits", page_size=2, page_token=token)
    assert [v.version for v in page] == [2, 1] and token == ""


def test_a_foreign_page_token_is_invalid(core: SqliteStore) -> None:
    register(core)
    with pytest.raises(InvalidArgument, match="page_token"):
        core.list_versions("digits", page_token="abc")


@pytest.mark.parametrize("token", ["garbage", "b", "after:Not A Name", "!!!!"])
def test_a_model_page_token_the_server_did_not_issue_is_invalid(
    core: SqliteStore, token: str
) -> None:
    register(core, "a")
    with pytest.raises(InvalidArgument, match="not one this server issued"):
        core.list_models(page_token=token)


@pytest.mark.parametrize("alias", ["Production", "a b", "../../x"])
def test_the_history_of_a_malformed_alias_is_invalid_not_empty(
    core: SqliteStore, alias: str
) -> None:
    register(core)
    with pytest.raises(InvalidArgument, match="malformed"):
        core.alias_history("digits", alias)


def test_models_are_summarised_by_name_in_pages(core: SqliteStore) -> None:
    for name in ("b", "a", "c"):
        register(core, name)
    register(core, "a", alias="production")
    page, token = core.list_models(page_size=2)
    assert [(m.name, m.latest_version, m.version_count) for m in page] == [("a", 2, 2), ("b", 1, 1)]
    assert page[0].aliases == {"production": 2}
    rest, end = core.list_models(page_size=2, page_token=token)
    assert [m.name for m in rest] == ["c"] and end == ""


# --- aliases -------------------------------------------------------------------------------------


def test_an_alias_resolves_to_its_version(core: SqliteStore) -> None:
    register(core)
    register(core)
    core.set_alias("digits", "production", 1, "bob")
    assert core.get_version(ModelRef("digits", alias="production")).version == 1
    assert core.get_version(ModelRef("digits", version=1)).aliases == ("production",)


def test_every_alias_move_is_kept_with_who_when_from_and_to(
    core: SqliteStore, clock: Clock
) -> None:
    register(core)
    register(core, alias="production")  # set at registration: created, from nothing
    core.set_alias("digits", "production", 1, "bob")
    core.delete_alias("digits", "production", "carol")
    history, _ = core.alias_history("digits", "production")
    assert [(c.from_version, c.to_version, c.actor) for c in history] == [
        (None, 2, "alice"),
        (2, 1, "bob"),
        (1, None, "carol"),
    ]
    assert [c.ts_ms for c in history] == sorted(c.ts_ms for c in history)


def test_an_alias_resolves_as_it_was_at_a_past_time(core: SqliteStore) -> None:
    register(core)
    register(core)
    core.set_alias("digits", "production", 1, "bob")
    tuesday = core.alias_history("digits")[0][-1].ts_ms
    core.set_alias("digits", "production", 2, "bob")
    assert core.get_version(ModelRef("digits", alias="production"), as_of_ms=tuesday).version == 1
    assert core.get_version(ModelRef("digits", alias="production")).version == 2
    with pytest.raises(NotFound, match="did not point anywhere"):
        core.get_version(ModelRef("digits", alias="production"), as_of_ms=tuesday - 1)


@pytest.mark.parametrize("ref", [ModelRef("digits", version=1), ModelRef("digits")])
def test_a_past_time_is_refused_for_a_ref_that_is_not_an_alias(
    core: SqliteStore, ref: ModelRef
) -> None:
    register(core)
    with pytest.raises(InvalidArgument, match="as_of_ms=5 applies only to an alias"):
        core.get_version(ref, as_of_ms=5)


def test_an_alias_cannot_point_at_a_missing_version(core: SqliteStore) -> None:
    register(core)
    with pytest.raises(NotFound, match="no version 5"):
        core.set_alias("digits", "production", 5, "bob")


@pytest.mark.parametrize("alias", ["Prod", "3", "", "a b", "x" * 65, "latest"])
def test_malformed_aliases_are_invalid(core: SqliteStore, alias: str) -> None:
    register(core)
    with pytest.raises(InvalidArgument, match="alias"):
        core.set_alias("digits", alias, 1, "bob")


def test_an_aliased_version_cannot_be_deleted(core: SqliteStore) -> None:
    register(core, alias="production")
    with pytest.raises(FailedPrecondition, match="production"):
        core.delete_version("digits", 1, "bob")


# --- lineage -------------------------------------------------------------------------------------


def test_lineage_walks_parents_to_the_root_and_lists_children(core: SqliteStore) -> None:
    register(core, "base")
    register(core, "tuned", parent={"name": "base", "version": 1})
    register(core, "small", parent={"name": "tuned", "version": 1})
    register(core, "other", parent={"name": "tuned", "version": 1})
    lineage = core.lineage("tuned", 1)
    assert [(n.name, n.version) for n in lineage.ancestors] == [("tuned", 1), ("base", 1)]
    assert [(n.name, n.method) for n in lineage.children] == [
        ("other", "finetune"),
        ("small", "finetune"),
    ]


def test_a_parent_must_be_registered(core: SqliteStore) -> None:
    with pytest.raises(NotFound, match="'base' is not registered"):
        register(core, "tuned", parent={"name": "base", "version": 1})
    assert core.list_models()[0] == []


# --- outbox --------------------------------------------------------------------------------------


def test_each_change_writes_its_event_to_the_outbox_in_order(core: SqliteStore) -> None:
    register(core, alias="production")
    register(core)
    core.set_alias("digits", "production", 2, "bob")
    core.delete_alias("digits", "production", "bob")
    core.delete_version("digits", 1, "bob")
    assert event_kinds(core) == [
        ("registered", "", 1),
        ("alias-set", "production", 1),
        ("registered", "", 2),
        ("alias-set", "production", 2),
        ("alias-deleted", "production", None),
        ("deleted", "", 1),
    ]
    for entry in core.pending_events():
        assert entry.key == "digits" and entry.topic == "maas.models.v1"
        events.validate(entry.event, events.MODEL)


def test_alias_events_say_where_the_alias_was_before(core: SqliteStore) -> None:
    register(core, alias="production")
    register(core)
    core.set_alias("digits", "production", 2, "bob")
    moved = core.pending_events()[-1].event
    assert (moved["version"], moved["previous_version"], moved["actor"]) == (2, 1, "bob")


def test_a_change_that_fails_leaves_no_event(core: SqliteStore) -> None:
    with pytest.raises(NotFound):
        register(core, "tuned", parent={"name": "base", "version": 1})
    with pytest.raises(NotFound):
        core.set_alias("digits", "production", 1, "bob")
    assert core.pending_events() == []


def test_sent_events_leave_the_pending_list(core: SqliteStore) -> None:
    register(core)
    register(core)
    first, second = core.pending_events()
    core.mark_sent([first.id])
    assert [e.id for e in core.pending_events()] == [second.id]


# --- durability ----------------------------------------------------------------------------------


def test_a_reopened_database_keeps_everything(tmp_path: Path) -> None:
    core = SqliteStore(tmp_path / "r.db")
    register(core, alias="production")
    core.close()
    again = SqliteStore(tmp_path / "r.db")
    assert again.get_version(ModelRef("digits", alias="production")).version == 1
    assert again.next_version("digits") == 2
    assert len(again.pending_events()) == 2
    again.close()


def test_the_database_is_in_wal_mode_with_migrations_recorded(core: SqliteStore) -> None:
    db = sqlite3.connect(core.path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    recorded = [r[0] for r in db.execute("SELECT version FROM schema_migrations")]
    assert recorded == [n for n, _ in MIGRATIONS]
    assert core.schema_version() == MIGRATIONS[-1][0]
    db.close()


def test_a_database_from_a_newer_registry_is_refused(tmp_path: Path) -> None:
    SqliteStore(tmp_path / "r.db").close()
    db = sqlite3.connect(tmp_path / "r.db")
    db.execute("INSERT INTO schema_migrations VALUES (99, 0)")
    db.commit()
    db.close()
    with pytest.raises(FailedPrecondition, match="schema version 99"):
        SqliteStore(tmp_path / "r.db")


# --- manifests -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("manifest", "message"),
    [
        (b"not json", "not JSON"),
        (b"[]", "JSON object"),
        (b'{"files": {"w": "' + b"0" * 64 + b'"}}', "manifest.arch"),
        (b'{"arch": "mlp", "files": {}}', "manifest.files"),
        (b'{"arch": "' + b"m" * 65 + b'", "files": {}}', "manifest.arch"),
        (b'{"arch": "mlp", "format": "' + b"x" * 100_000 + b'"}', "manifest.format"),
        (b'{"arch": "mlp", "format": "Int8 please"}', "manifest.format"),
        (b'{"arch": "mlp", "files": {"w": "abc"}}', "sha256"),
        (b'{"arch": "mlp", "files": {"../x": "' + b"0" * 64 + b'"}}', "file name"),
        (
            b'{"arch": "mlp", "files": {"w": "' + b"0" * 64 + b'"}, "parent": {"name": "a"}}',
            "manifest.parent",
        ),
        (
            b'{"arch": "mlp", "files": {"w": "' + b"0" * 64 + b'"}, "metrics": {"a": "x"}}',
            "manifest.metrics",
        ),
    ],
)
def test_malformed_manifests_are_invalid(manifest: bytes, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        parse_manifest(manifest)
