"""What the compressor's core works with, beside it: the registry calls it needs, the version
being compressed (``Parent``), a measured variant (``Built``), what a job made (``Outcome``), and
how a version's dataset is found in its lineage."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from maas.compression.train import Tensors
from maas.manifest import Manifest
from maas.registry.types import ModelRef, ModelVersion
from maas.text.model import ARCH as TEXT_ARCH


class Registry(Protocol):
    """What the compressor needs of ``maas.registry.RegistryClient``."""

    async def get(self, ref: ModelRef | str) -> ModelVersion: ...

    async def fetch(
        self, ref: ModelRef | str
    ) -> tuple[ModelVersion, Manifest, dict[str, bytes]]: ...

    def iter_versions(self, name: str) -> AsyncIterator[ModelVersion]: ...

    async def register(
        self,
        module_or_state: Mapping[str, torch.Tensor],
        name: str,
        arch: str,
        config: Mapping[str, Any],
        *,
        parent: ModelVersion | None = None,
        method: str | None = None,
        settings: Mapping[str, Any] | None = None,
        job_id: str | None = None,
        metrics: Mapping[str, float] | None = None,
        format: str = "dense",
        alias: str | None = None,
    ) -> ModelVersion: ...


Publish = Callable[[dict[str, Any]], Awaitable[None]]
ClaimId = Callable[[str, str, str], Awaitable[None]]  # (job id, type, content sha256)


def dataset_of(manifest: Manifest) -> dict[str, Any] | None:
    """The dataset a version was trained/compressed on, as recorded in its lineage settings."""
    recorded = manifest.settings.get("dataset")
    if isinstance(recorded, str):
        return {"uri": recorded}
    if isinstance(recorded, Mapping) and "uri" in recorded:
        return dict(recorded)
    return None


@dataclass(frozen=True)
class Parent:
    """The version being compressed, loaded and measured once per job."""

    version: ModelVersion
    manifest: Manifest
    model: nn.Module
    data: Tensors
    dataset: dict[str, Any]
    metrics: dict[str, float]


@dataclass(frozen=True)
class Built:
    """One measured variant, ready to register."""

    arch: str
    config: dict[str, Any]
    format: str
    tensors: dict[str, torch.Tensor]
    metrics: dict[str, float]


@dataclass(frozen=True)
class Outcome:
    """What a job made: the parent as measured in this run, and every variant, in plan order."""

    parent_metrics: dict[str, float]
    versions: list[ModelVersion]
    cancelled: bool = False


# Acts on a finished job's outcome before it says succeeded; returns the reason it carries.
Conclude = Callable[[Outcome], Awaitable[str]]
# Asked before each variant: "" to go on, or why the job is no longer wanted.
Wanted = Callable[[], Awaitable[str]]


def dataset_mismatch(uri: str, row: int, features: int, ref: str, arch: str) -> str:
    """Why the dataset's rows (``row`` values) do not fit the model that reads ``features``: a
    text model's rows are token ids, as many as its max_seq_length, not features."""
    if arch == TEXT_ARCH:
        return (
            f"dataset {uri} has rows of {row} tokens but {ref} reads rows of {features} "
            "tokens (its max_seq_length); name a text dataset tokenized to that length, such as "
            "the one it was fine-tuned on"
        )
    return (
        f"dataset {uri} has {row} features per row but {ref} takes {features}; "
        "name the dataset it was trained on"
    )
