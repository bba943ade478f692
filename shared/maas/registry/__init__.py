"""The model registry from the outside: references, versions, the client, sync shortcuts.

    from maas.registry import ModelRef, RegistryClient, load, register

``register`` / ``load`` here are blocking shortcuts for scripts and tests (one client per call,
not for use inside a running event loop); services keep one ``RegistryClient`` open instead.
The client (and with it torch) is imported on first use, so the registry server, which only
needs the plain values, stays small.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from maas.config import Settings
from maas.registry.types import (
    AliasChange,
    ArtifactFile,
    Lineage,
    LineageNode,
    ModelRef,
    ModelSummary,
    ModelVersion,
    PolicyVersion,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

    from maas.registry.client import RegistryClient

__all__ = [
    "AliasChange",
    "ArtifactFile",
    "Lineage",
    "LineageNode",
    "ModelRef",
    "ModelSummary",
    "ModelVersion",
    "PolicyVersion",
    "RegistryClient",
    "load",
    "register",
]


def __getattr__(name: str) -> Any:
    if name == "RegistryClient":
        from maas.registry.client import RegistryClient

        return RegistryClient
    raise AttributeError(f"module 'maas.registry' has no attribute {name!r}")


def register(
    module_or_state: nn.Module | Mapping[str, torch.Tensor],
    name: str,
    arch: str,
    config: Mapping[str, Any],
    *,
    platform_settings: Settings | None = None,
    **options: Any,
) -> ModelVersion:
    """Blocking ``RegistryClient.register`` (same keyword options: parent, method, settings,
    job_id, metrics, format, extra_files, alias). ``platform_settings`` defaults to the env."""
    from maas.registry.client import RegistryClient

    async def run() -> ModelVersion:
        async with RegistryClient(platform_settings or Settings.from_env()) as client:
            return await client.register(module_or_state, name, arch, config, **options)

    return asyncio.run(run())


def load(ref: ModelRef | str, *, platform_settings: Settings | None = None) -> nn.Module:
    """Blocking ``RegistryClient.load`` of ``name``, ``name@3`` or ``name@production``."""
    from maas.registry.client import RegistryClient

    async def run() -> nn.Module:
        async with RegistryClient(platform_settings or Settings.from_env()) as client:
            return await client.load(ref)

    return asyncio.run(run())
