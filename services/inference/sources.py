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


class RegistrySource:
    def __init__(self, client: RegistryClient) -> None:
        self._client = client

    async def resolve(self, name: str, alias: str) -> int:
        return (await self._client.get(ModelRef(name, alias=alias))).version

    async def fetch(self, name: str, version: int) -> tuple[artifacts.Manifest, dict[str, bytes]]:
        _, manifest, files = await self._client.fetch(ModelRef(name, version=version))
        return manifest, files


class MemorySource:
    """Versions numbered 1, 2, ... per model, with aliases; artifacts packed as in S3."""

    def __init__(self) -> None:
        self._versions: dict[tuple[str, int], tuple[artifacts.Manifest, dict[str, bytes]]] = {}
        self._aliases: dict[tuple[str, str], int] = {}

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

    def delete_alias(self, name: str, alias: str) -> None:
        self._aliases.pop((name, alias), None)

    def files(self, name: str, version: int) -> dict[str, bytes]:
        """The stored files themselves (tests tamper with them)."""
        return self._versions[(name, version)][1]

    async def resolve(self, name: str, alias: str) -> int:
        try:
            return self._aliases[(name, alias)]
        except KeyError:
            raise NotFound(f"model {name!r} has no alias {alias!r}") from None

    async def fetch(self, name: str, version: int) -> tuple[artifacts.Manifest, dict[str, bytes]]:
        try:
            manifest, files = self._versions[(name, version)]
        except KeyError:
            raise NotFound(f"model {name!r} has no version {version}") from None
        return manifest, dict(files)
