"""Where served versions come from (``ModelSource`` implementations).

``RegistrySource`` is production: aliases resolve through the registry, files come straight from
S3, each checked against the sha256 the registry recorded. ``MemorySource`` holds packed
artifacts in memory: an embedded server without a registry, and the registry's stand-in in unit
tests.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from maas import artifacts
from maas.errors import NotFound
from maas.registry import ModelRef, RegistryClient
from maas.registry.types import DEFAULT_ALIAS, PRIMARY_METHODS, AliasTargets


class RegistrySource:
    def __init__(self, client: RegistryClient) -> None:
        self._client = client

    async def resolve(self, name: str, alias: str) -> int:
        # No alias: the registry's own order for a bare name (production, else the newest
        # trained, fine-tuned or imported version), never a rule of ours.
        return (await self._client.get(ModelRef(name, alias=alias or None))).version

    async def split(self, name: str, alias: str) -> AliasTargets:
        """``alias``'s weighted targets (a bare name: production's); () when it has none."""
        try:
            return await self._client.alias_targets(name, alias or DEFAULT_ALIAS)
        except NotFound:
            return ()

    async def fetch(self, name: str, version: int) -> tuple[artifacts.Manifest, dict[str, bytes]]:
        _, manifest, files = await self._client.fetch(ModelRef(name, version=version))
        return manifest, files

    async def catalogue(self) -> list[tuple[str, int]]:
        return [
            (m.name, m.latest_version)
            for m in await self._client.list_models()
            if m.latest_version is not None
        ]


class MemorySource:
    """Versions numbered 1, 2, ... per model, with aliases; artifacts packed as in S3."""

    def __init__(self) -> None:
        self._versions: dict[tuple[str, int], tuple[artifacts.Manifest, dict[str, bytes]]] = {}
        self._aliases: dict[tuple[str, str], int] = {}
        self._splits: dict[tuple[str, str], AliasTargets] = {}

    def add(
        self,
        name: str,
        module: nn.Module | Mapping[str, torch.Tensor],
        arch: str,
        config: Mapping[str, Any],
        *,
        aliases: Iterable[str] = (),
    ) -> int:
        files, manifest = artifacts.pack(module, arch, config)
        return self.add_artifact(name, files, manifest, aliases=aliases)

    def add_artifact(
        self,
        name: str,
        files: dict[str, bytes],
        manifest: artifacts.Manifest,
        *,
        aliases: Iterable[str] = (),
    ) -> int:
        """Add already-packed files (any stored format) as the next version."""
        version = 1 + max((v for (n, v) in self._versions if n == name), default=0)
        self._versions[(name, version)] = (manifest, files)
        for alias in aliases:
            self.set_alias(name, alias, version)
        return version

    def set_alias(self, name: str, alias: str, version: int) -> None:
        self._aliases[(name, alias)] = version
        self._splits.pop((name, alias), None)

    def set_split(self, name: str, alias: str, targets: AliasTargets) -> None:
        """Split ``alias`` by weight (heaviest first); it resolves to the heaviest."""
        self._aliases[(name, alias)] = targets[0][0]
        self._splits[(name, alias)] = targets

    async def split(self, name: str, alias: str) -> AliasTargets:
        return self._splits.get((name, alias or DEFAULT_ALIAS), ())

    def delete_alias(self, name: str, alias: str) -> None:
        self._aliases.pop((name, alias), None)

    def files(self, name: str, version: int) -> dict[str, bytes]:
        """The stored files themselves (tests tamper with them)."""
        return self._versions[(name, version)][1]

    async def resolve(self, name: str, alias: str) -> int:
        if not alias:
            return self._bare(name)
        try:
            return self._aliases[(name, alias)]
        except KeyError:
            raise NotFound(f"model {name!r} has no alias {alias!r}") from None

    def _bare(self, name: str) -> int:
        """The registry's rule: ``production``, else the newest version that training,
        fine-tuning or an import made (a compressed variant only once promoted)."""
        if (name, DEFAULT_ALIAS) in self._aliases:
            return self._aliases[(name, DEFAULT_ALIAS)]
        made = [
            v
            for (n, v), (manifest, _) in self._versions.items()
            if n == name and (manifest.method is None or manifest.method in PRIMARY_METHODS)
        ]
        if not made:
            raise NotFound(f"model {name!r} has no production alias and no trained version")
        return max(made)

    async def catalogue(self) -> list[tuple[str, int]]:
        latest: dict[str, int] = {}
        for name, version in self._versions:
            latest[name] = max(version, latest.get(name, 0))
        return sorted(latest.items())

    async def fetch(self, name: str, version: int) -> tuple[artifacts.Manifest, dict[str, bytes]]:
        try:
            manifest, files = self._versions[(name, version)]
        except KeyError:
            raise NotFound(f"model {name!r} has no version {version}") from None
        return manifest, dict(files)
