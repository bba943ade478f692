"""Weighted aliases and policies in the registry's SQLite store: a split is stored, resolved to
its heaviest version, kept in the history with its weights and in its event; a version in a
split cannot be deleted; policies are versioned per model."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_registry_core import register

from maas.errors import FailedPrecondition, InvalidArgument, NotFound
from maas.registry.types import ModelRef, check_targets
from services.model_registry.sqlite_store import SqliteStore


@pytest.fixture
def core(tmp_path: Path) -> SqliteStore:
    core = SqliteStore(tmp_path / "registry.db")
    for _ in range(3):
        register(core)
    yield core
    core.close()


def test_a_split_resolves_to_its_heaviest_version_and_lists_every_target(core):
    change = core.set_alias("digits", "production", 0, "alice", targets=((3, 10), (2, 90)))
    assert (change.to_version, change.targets) == (2, ((2, 90), (3, 10)))
    assert core.get_version(ModelRef("digits", alias="production")).version == 2
    assert core.alias_targets("digits", "production") == ((2, 90), (3, 10))


def test_an_alias_on_one_version_has_one_target_of_weight_100(core):
    core.set_alias("digits", "production", 1, "alice")
    assert core.alias_targets("digits", "production") == ((1, 100),)


def test_the_history_keeps_each_split_and_the_move_back(core):
    core.set_alias("digits", "production", 0, "alice", targets=((2, 90), (3, 10)))
    core.set_alias("digits", "production", 2, "bob", "rollback")
    history, _ = core.alias_history("digits", "production")
    assert [(c.to_version, c.targets, c.reason) for c in history] == [
        (2, ((2, 90), (3, 10)), ""),
        (2, (), "rollback"),
    ]
    assert core.alias_targets("digits", "production") == ((2, 100),)


def test_the_alias_set_event_carries_the_split(core):
    core.set_alias("digits", "production", 0, "alice", targets=((2, 90), (3, 10)))
    event = core.pending_events(limit=100)[-1].event
    assert event["version"] == 2
    assert event["targets"] == [{"version": 2, "weight": 90}, {"version": 3, "weight": 10}]


def test_a_version_in_a_split_cannot_be_deleted(core):
    core.set_alias("digits", "production", 0, "alice", targets=((2, 90), (3, 10)))
    with pytest.raises(FailedPrecondition, match="production"):
        core.delete_version("digits", 3, "alice")


def test_a_split_naming_a_missing_version_changes_nothing(core):
    with pytest.raises(NotFound):
        core.set_alias("digits", "production", 0, "alice", targets=((2, 90), (9, 10)))
    with pytest.raises(NotFound):
        core.alias_targets("digits", "production")


@pytest.mark.parametrize(
    ("targets", "says"),
    [
        ((), "at least one"),
        (((2, 90), (2, 10)), r"version\(s\) \[2\] more than once"),
        (tuple((v, 1) for v in range(1, 1002)), "1001 given; a split takes at most 100"),
        (((2, 90), (3, 20)), "weigh 110"),
        (((2, 100), (3, 0)), "weight 0 of version 3"),
        (((0, 100),), "version 0"),
    ],
)
def test_a_wrong_split_is_refused_saying_what_is_accepted(targets, says):
    with pytest.raises(InvalidArgument, match=says):
        check_targets(targets)


def test_each_policy_set_is_a_new_version_and_earlier_ones_stay(core):
    core.set_policy("digits", {"promote": {"alias": "production", "rule": "best_accuracy"}}, "a")
    core.set_policy("digits", {"promote": {"alias": "staging", "rule": "best_accuracy"}}, "b")
    assert core.get_policy("digits").version == 2
    assert core.get_policy("digits", 1).document["promote"]["alias"] == "production"
    with pytest.raises(NotFound, match="no policy version 3"):
        core.get_policy("digits", 3)
