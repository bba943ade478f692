"""What a bare model name resolves to: `production` if set, else the newest version made by
training, fine-tuning or import; a compressed variant is never picked unless promoted."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from maas.errors import NotFound
from maas.manifest import parse_manifest
from maas.registry.types import DEFAULT_ALIAS, ModelRef
from services.model_registry.sqlite_store import SqliteStore
from services.model_registry.store import NewVersion


def register(core: SqliteStore, method: str | None, name: str = "digits") -> int:
    data = json.dumps(
        {
            "arch": "mlp",
            "config": {},
            "format": "dense",
            "files": {"weights.safetensors": hashlib.sha256(b"w").hexdigest()},
            "method": method,
            "metrics": {},
            "settings": {},
        }
    ).encode()
    new = NewVersion(
        name=name,
        manifest_json=data,
        manifest=parse_manifest(data),
        bucket="maas-models",
        file_sizes={"weights.safetensors": 1},
        actor="alice",
    )
    return core.add_version(new, version=core.next_version(name)).version


@pytest.fixture
def core(tmp_path: Path):
    core = SqliteStore(tmp_path / "registry.db")
    yield core
    core.close()


def resolve(core: SqliteStore, name: str = "digits") -> int:
    return core.get_version(ModelRef(name)).version


@pytest.mark.parametrize("variant", ["quantize", "prune", "distill", "chain"])
def test_variants_registered_after_training_do_not_become_the_default(core, variant):
    trained = register(core, "train")
    register(core, variant)
    assert resolve(core) == trained


def test_a_newer_finetune_or_import_is_the_default(core):
    register(core, "train")
    register(core, "quantize")
    finetuned = register(core, "finetune")
    assert resolve(core) == finetuned
    imported = register(core, "import")
    assert resolve(core) == imported


def test_production_wins_even_when_it_points_at_a_variant(core):
    register(core, "train")
    variant = register(core, "quantize")
    core.set_alias("digits", DEFAULT_ALIAS, variant, "alice")
    assert resolve(core) == variant


def test_a_version_without_a_method_counts_as_primary(core):
    register(core, "train")
    unlabelled = register(core, None)
    assert resolve(core) == unlabelled


def test_a_name_holding_only_variants_says_how_to_promote_one(core):
    register(core, "quantize", name="digits-int8")
    with pytest.raises(NotFound, match="only compressed variants.*maas models alias digits-int8"):
        resolve(core, "digits-int8")


def test_an_explicit_version_or_alias_still_reaches_a_variant(core):
    register(core, "train")
    variant = register(core, "prune")
    assert core.get_version(ModelRef("digits", version=variant)).method == "prune"
