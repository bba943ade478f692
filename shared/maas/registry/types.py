"""What the registry talks about, as plain values shared by its server, client and CLI.

Nothing here imports torch or grpc: the registry server stays small, and the same values come
out of the SQLite core, the client and ``maas models``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from maas.errors import InvalidArgument
from maas.names import check_alias, check_name, check_version, version_number


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
        number = version_number(selector)
        if number is not None:
            return cls(name, version=number)
        if not selector:  # the name checked first: the message quotes it, and it may be huge
            raise InvalidArgument(
                f"'{check_name(name)}@': nothing after '@'; use NAME@VERSION or NAME@ALIAS"
            )
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


# A weighted alias: (version, percent of the traffic), heaviest first; weights sum to 100.
AliasTargets = tuple[tuple[int, int], ...]
WEIGHT_TOTAL = 100


def check_targets(targets: Sequence[tuple[int, int]]) -> AliasTargets:
    """A split as stored: distinct versions, whole-percent weights summing to 100, heaviest
    first (ties: the lower version first). InvalidArgument names what is wrong."""
    if not targets:
        raise InvalidArgument("targets: give at least one VERSION=WEIGHT")
    if len(targets) > WEIGHT_TOTAL:
        raise InvalidArgument(
            f"targets: {len(targets)} given; a split takes at most {WEIGHT_TOTAL} versions "
            "(each weighs at least 1 percent)"
        )
    versions = [check_version(v) for v, _ in targets]
    twice = sorted({v for v in versions if versions.count(v) > 1})
    if twice:
        raise InvalidArgument(f"targets name version(s) {twice} more than once; name each once")
    for version, weight in targets:
        if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= 100:
            raise InvalidArgument(
                f"targets: weight {weight!r} of version {version} is not accepted; "
                "use a whole percentage from 1 to 100"
            )
    total = sum(w for _, w in targets)
    if total != WEIGHT_TOTAL:
        shown = ", ".join(f"{v}={w}" for v, w in targets)
        raise InvalidArgument(f"targets {shown} weigh {total} in all; weights must sum to 100")
    return tuple(sorted(((v, w) for v, w in targets), key=lambda t: (-t[1], t[0])))


@dataclass(frozen=True)
class AliasChange:
    """One alias move: ``from_version`` None = created, ``to_version`` None = deleted. A split
    moves ``to_version`` to its heaviest target and lists every one in ``targets``."""

    name: str
    alias: str
    from_version: int | None
    to_version: int | None
    actor: str
    ts_ms: int
    reason: str = ""
    targets: AliasTargets = ()


@dataclass(frozen=True)
class PolicyVersion:
    """One stored version of a model's policy (``maas.policy``), as its checked document."""

    name: str
    version: int
    document: dict[str, Any]
    actor: str
    created_ms: int


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
