"""Fixtures shared by unit tests: the digits tensors and one trained MLP (compression), a worker
pool and a counting registry (the inference data plane), a compressor service that records its
statuses."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch
from dataplane_kit import CountingSource, digits_source
from torch import nn

from maas import zoo
from maas.compression.train import FitConfig, Tensors, fit
from maas.datasets import load_builtin


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    # These models are tiny: a second OpenMP thread adds nothing but stalls on a loaded host.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def digits() -> Tensors:
    return Tensors.of(load_builtin("digits"))


@pytest.fixture(scope="session")
def trained_mlp(digits: Tensors) -> nn.Module:
    """The default digits MLP after 1000 seeded steps: the parent/teacher of the variants.
    Shared across modules, so tests must not modify it (the compression pipeline copies)."""
    return fit(zoo.build("mlp", {}, seed=0), digits, FitConfig(steps=1000, seed=0))


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    """Two worker threads, as the inference server runs its forwards."""
    with ThreadPoolExecutor(max_workers=2) as executor:
        yield executor


@pytest.fixture
def source() -> CountingSource:
    """The data-plane tests' registry: versions 1 (production) and 2 (staging) of ``digits``."""
    return digits_source()


@pytest.fixture
async def compressor_service() -> Any:
    """A compressor service, never started, whose statuses land in ``.published``."""
    from maas.config import Settings
    from services.compressor.service import CompressorService

    made: Any = CompressorService(Settings.from_env())
    made.published = []

    async def publish(event: dict[str, object]) -> None:
        made.published.append(event)

    made._publish = publish
    return made
