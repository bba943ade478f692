"""The job file reference (maas.jobref): docs/USER-GUIDE.md holds exactly what the schema and the
code generate, every key the example jobs use is in it, and its defaults are what a job gets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from maas import jobref
from maas.compression.pipeline import parse_method
from maas.training.plan import TrainingSpec

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "USER-GUIDE.md"
EXAMPLES = sorted((ROOT / "examples" / "jobs").glob("*.yaml"))


@pytest.fixture(scope="module")
def rows() -> dict[str, jobref.Row]:
    return {row.path: row for row in jobref.rows()}


def test_the_user_guide_holds_the_generated_reference() -> None:
    section = jobref.current_section(GUIDE.read_text())
    assert section, f"{GUIDE} has no job reference section"
    assert section == jobref.render(), (
        "regenerate: python -m maas.jobref --write docs/USER-GUIDE.md"
    )


def _paths(doc: Any, prefix: str = "") -> set[str]:
    """Every key path of a job document; list items as ``key[]``."""
    out: set[str] = set()
    if isinstance(doc, dict):
        for key, value in doc.items():
            out |= {f"{prefix}{key}"} | _paths(value, f"{prefix}{key}.")
    elif isinstance(doc, list):
        for item in doc:
            out |= _paths(item, f"{prefix.removesuffix('.')}[].")
    return out


def _documented(path: str, rows: dict[str, jobref.Row]) -> bool:
    """A path has a row, or lies under a free-form map (a row with no children, e.g. config),
    or under a row documented ``as`` another path."""
    if path in rows:
        return True
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        parent = ".".join(parts[:cut])
        if parent not in rows:
            continue
        same_as = rows[parent].notes.rpartition("as `")[2].rstrip("`")
        if same_as and same_as in rows:
            return _documented(".".join([same_as, *parts[cut:]]), rows)
        return not any(p.startswith(parent + ".") for p in rows)
    return False


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_every_key_an_example_job_uses_is_documented(
    example: Path, rows: dict[str, jobref.Row]
) -> None:
    paths = _paths(yaml.safe_load(example.read_text()))
    assert sorted(p for p in paths if not _documented(p, rows)) == []


def test_a_misspelled_key_is_not_documented(rows: dict[str, jobref.Row]) -> None:
    assert _documented("training.optimizer.lr", rows)
    assert _documented("model.config.hidden", rows)  # free-form: the zoo checks it
    assert _documented("compress.methods[].chain[].prune.sparsity", rows)
    assert not _documented("training.optimiser.lr", rows)
    assert not _documented("compress.methods[].chain[].prune.sparsty", rows)


NOT_LITERAL = object()


def _literal(default: str) -> Any:
    """A default written as one JSON value in backticks (not e.g. `workers` or a note)."""
    if default.count("`") != 2 or not (default.startswith("`") and default.endswith("`")):
        return NOT_LITERAL
    try:
        return json.loads(default.strip("`"))
    except ValueError:
        return NOT_LITERAL


def test_training_defaults_are_what_a_job_without_them_gets(rows: dict[str, jobref.Row]) -> None:
    spec = TrainingSpec.from_job({}, max_workers=64, max_shards=64, default_deadline_ms=1)
    literal = {
        path: _literal(row.default)
        for path, row in rows.items()
        if path.startswith("training.") and _literal(row.default) is not NOT_LITERAL
    }
    assert len(literal) > 10
    for path, default in literal.items():
        value: Any = spec
        for part in path.split(".")[1:]:
            value = getattr(value, part)
        assert value == default, path


def test_compress_defaults_are_what_an_empty_method_gets(rows: dict[str, jobref.Row]) -> None:
    for method in ("quantize", "prune", "distill"):
        (step,) = parse_method({method: {}}).steps
        prefix = f"compress.methods[].{method}."
        literal = {
            p[len(prefix) :]: _literal(r.default)
            for p, r in rows.items()
            if p.startswith(prefix) and _literal(r.default) is not NOT_LITERAL
        }
        assert literal, method
        for name, default in literal.items():
            assert getattr(step, name) == default, f"{prefix}{name}"


def test_required_fields_and_conditional_requirements_are_marked(
    rows: dict[str, jobref.Row],
) -> None:
    assert rows["type"].notes.startswith("**required**")
    assert rows["model.arch"].notes.startswith("**required** for `type: train`")
    assert not rows["model.name"].notes.startswith("**required**")


def test_replace_section_swaps_only_the_generated_part() -> None:
    old = f"intro\n{jobref.BEGIN}\nstale\n{jobref.END}\noutro\n"
    assert jobref.replace_section(old, "NEW") == "intro\nNEW\noutro\n"
    with pytest.raises(ValueError, match="no job reference section"):
        jobref.replace_section("no markers here", "NEW")
