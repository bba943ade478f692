"""A training process caps its compute thread pools at its share of the host's cores."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_info, threadpool_limits

from maas.lifecycle import limit_compute_threads


@pytest.fixture
def restored() -> Iterator[None]:
    torch_threads = torch.get_num_threads()
    with threadpool_limits():  # restores every pool's size on exit
        yield
    torch.set_num_threads(torch_threads)


def test_torch_and_every_blas_pool_get_the_limit(restored: None) -> None:
    np.ones(4) @ np.ones(4)  # BLAS is loaded by the time a service computes
    limit_compute_threads(1)
    assert torch.get_num_threads() == 1
    pools = threadpool_info()
    assert pools, "numpy's BLAS should be visible to threadpoolctl"
    assert {pool["num_threads"] for pool in pools} == {1}
