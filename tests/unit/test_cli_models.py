"""`maas models list NAME --method M --parent NAME@V`: a compress job's variants, found; filters
that match nothing say what would have matched."""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import dataclass

import pytest

from maas.cli_models import _history, _list, _table
from maas.errors import InvalidArgument, NotFound
from maas.registry.types import ModelRef


@dataclass
class Version:
    version: int
    method: str | None
    parent: ModelRef | None
    name: str = "digits"
    aliases: tuple[str, ...] = ()
    arch: str = "mlp"
    format: str = "dense"
    created_ms: int = 0
    created_by: str = "test"


class Registry:
    """The one call `models list NAME` makes, over fixed versions."""

    def __init__(self, versions: list[Version]) -> None:
        self.versions = versions

    async def iter_versions(self, name: str):
        for v in self.versions:
            yield v


VERSIONS = [
    Version(1, "train", None),
    Version(2, "quantize", ModelRef("digits", version=1)),
    Version(3, "prune", ModelRef("digits", version=1)),
    Version(4, "finetune", ModelRef("digits", version=1)),
    Version(5, "quantize", ModelRef("digits", version=4)),
]


def listed(capsys, method=None, parent=None) -> list[int]:
    args = argparse.Namespace(name="digits", method=method, parent=parent)
    asyncio.run(_list(Registry(VERSIONS), args))
    lines = capsys.readouterr().out.splitlines()[1:]
    return [int(line.split()[0]) for line in lines]


def test_variants_are_found_by_parent(capsys):
    assert listed(capsys, parent="digits@1") == [2, 3, 4]


def test_variants_are_found_by_method(capsys):
    assert listed(capsys, method="quantize") == [2, 5]


def test_both_filters_together(capsys):
    assert listed(capsys, method="quantize", parent="digits@4") == [5]


def test_filters_without_a_model_name_are_refused():
    args = argparse.Namespace(name=None, method="quantize", parent=None)
    with pytest.raises(InvalidArgument, match="give NAME"):
        asyncio.run(_list(Registry([]), args))


def test_filters_that_match_nothing_say_so_listing_what_would_match():
    args = argparse.Namespace(name="digits", method="trian", parent=None)
    with pytest.raises(NotFound) as refused:
        asyncio.run(_list(Registry(VERSIONS), args))
    assert refused.value.message == (
        "no version of digits has --method trian; its methods: finetune, prune, quantize, "
        "train; its parents: digits@1, digits@4"
    )


@dataclass
class Change:
    alias: str


class History:
    async def alias_history(self, name: str, alias: str | None):
        changes = [Change("production"), Change("staging"), Change("production")]
        return [c for c in changes if alias is None or c.alias == alias]


def test_the_history_of_an_alias_the_model_never_had_says_which_it_had():
    args = argparse.Namespace(name="digits", alias="prodution", at=None)
    with pytest.raises(NotFound) as refused:
        asyncio.run(_history(History(), args))
    assert refused.value.message == (
        "digits has never had an alias prodution; the aliases it has had: production, staging"
    )


def test_a_table_cell_holding_an_escape_sequence_prints_it_escaped(capsys):
    _table([["REASON"], ["rollback \x1b[2J now"]])
    out = capsys.readouterr().out
    assert "rollback \\x1b[2J now" in out and "\x1b" not in out
