"""What the registry talks about, as plain values shared by its server, client and CLI.

Nothing here imports torch or grpc: the registry server stays small, and the same values come
out of the SQLite core, the client and ``maas models``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from maas.errors import InvalidArgument

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# An alias starts with a letter so `name@3` (version) and `name@prod` (alias) never read alike.
ALIAS_PATTERN = re.compile(r"[a-z][a-z0-9_-]{0,63}")
MANIFEST_FILE = "manifest.json"


def _shown(value: object) -> str:
    """A bounded rendering of a refused value (it may be huge, or not text at all)."""
    return repr(value[:80]) if isinstance(value, str) else f"of type {type(value).__name__}"


def check_name(name: str, *, what: str = "model name") -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or ".." in name:
        raise InvalidArgument(
            f"{what} {_shown(name)} is malformed: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (e.g. 'digits-mlp')"
        )
    return name


def check_alias(alias: str) -> str:
    if not isinstance(alias, str) or not ALIAS_PATTERN.fullmatch(alias):
        raise InvalidArgument(
            f"alias {_shown(alias)} is malformed: use 1-64 lowercase letters, digits, '_' or '-', "
            "starting with a letter (e.g. 'production')"
        )
    return alias


MAX_VERSION = 2**63 - 1  # int64, as on the wire and in SQLite


def check_version(version: int) -> int:
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= MAX_VERSION:
        if not isinstance(version, int) or isinstance(version, bool):
            shown = f"of type {type(version).__name__}"
        else:
            shown = str(version) if abs(version) <= MAX_VERSION else "beyond int64"
        raise InvalidArgument(
            f"version {shown} is malformed: versions are integers from 1 to {MAX_VERSION}"
        )
    return version


def artifact_prefix(name: str, version: int) -> str:
    """Where a version's files live inside the models bucket."""
    return f"{name}/{version}/"


# What a bare ``name`` resolves to: the ``production`` alias if it is set, else the newest version
# made by one of PRIMARY_METHODS (or registered without a method). A compressed variant (int8,
# pruned, distilled) is never picked by default: someone has to promote it with an alias.
DEFAULT_ALIAS = "production"
PRIMARY_METHODS: tuple[str, ...] = ("train", "finetune", "import")


@dataclass(frozen=True)
class ModelRef:
    """``name`` (see DEFAULT_ALIAS), ``name@3`` (a version) or ``name@production`` (an alias)."""

    name: str
    version: int | None = None
    alias: str | None = None

    def __post_init__(self) -> None:
        check_name(self.name)
        if self.version is not None and self.alias is not None:
            raise InvalidArgument(f"{self.name}: give a version or an alias, not both")
        if self.version is not None:
            check_version(self.version)
        if self.alias is not None:
            check_alias(self.alias)

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        name, sep, selector = text.strip().partition("@")
        if not sep:
            return cls(name)
        if selector.isdigit():
            return cls(name, version=int(selector))
        if not selector:
            raise InvalidArgument(f"{text!r}: nothing after '@'; use NAME@VERSION or NAME@ALIAS")
        return cls(name, alias=selector)

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}@{self.version}"
        if self.alias is not None:
            return f"{self.name}@{self.alias}"
        return self.name


@dataclass(frozen=True)
class ArtifactFile:
    name: str
    sha256: str
    size_bytes: int


@dataclass(frozen=True)
class ModelVersion:
    """One registered version: where its files are, what they hash to, where it came from."""

    name: str
    version: int
    arch: str
    format: str
    manifest_json: bytes  # byte for byte what manifest.json in S3 holds
    manifest_sha256: str
    files: tuple[ArtifactFile, ...]
    bucket: str
    prefix: str
    parent: ModelRef | None = None
    method: str | None = None
    job_id: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    created_ms: int = 0
    created_by: str = ""
    size_bytes: int = 0
    deleted_ms: int | None = None

    @property
    def ref(self) -> ModelRef:
        return ModelRef(self.name, version=self.version)

    def manifest(self) -> dict[str, Any]:
        return dict(json.loads(self.manifest_json))

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.manifest().get("config") or {})

    def key(self, file_name: str) -> str:
        return f"{self.prefix}{file_name}"


@dataclass(frozen=True)
class ModelSummary:
    name: str
    latest_version: int | None
    version_count: int
    aliases: dict[str, int]
    created_ms: int
    updated_ms: int


@dataclass(frozen=True)
class AliasChange:
    """One alias move: ``from_version`` None = created, ``to_version`` None = deleted."""

    name: str
    alias: str
    from_version: int | None
    to_version: int | None
    actor: str
    ts_ms: int


@dataclass(frozen=True)
class LineageNode:
    name: str
    version: int
    method: str | None
    job_id: str | None
    created_ms: int
    deleted: bool = False


@dataclass(frozen=True)
class Lineage:
    ancestors: tuple[LineageNode, ...]  # the version itself first, then up to the root
    children: tuple[LineageNode, ...]
