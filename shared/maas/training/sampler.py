"""Which rows a worker trains on at each step: a pure function of (seed, worker, step).

Each worker walks its own shard of the training rows in a seeded permutation per epoch, taking
consecutive ``batch_size`` slices and wrapping into the next epoch's permutation. Because the batch
depends only on the step, a restarted worker picks up exactly where the job is, and the local
reference trainer sees the same batches as the distributed run.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from maas.errors import InvalidArgument


@lru_cache(maxsize=64)
def _permutation(rows: int, seed: int, worker: int, epoch: int) -> np.ndarray:
    perm = np.random.default_rng([seed, worker, epoch]).permutation(rows)
    perm.flags.writeable = False  # shared through the cache
    return perm


def batch_indices(rows: int, batch_size: int, step: int, *, seed: int, worker: int) -> np.ndarray:
    """Row indices (into the worker's shard) of the batch for ``step``."""
    if rows < 1 or batch_size < 1 or step < 0:
        raise InvalidArgument(
            f"cannot sample a batch: rows={rows}, batch_size={batch_size}, step={step}"
        )
    positions = np.arange(step * batch_size, (step + 1) * batch_size, dtype=np.int64)
    epochs, within = np.divmod(positions, rows)
    out = np.empty(batch_size, dtype=np.int64)
    for epoch in np.unique(epochs):
        mask = epochs == epoch
        out[mask] = _permutation(rows, seed, worker, int(epoch))[within[mask]]
    return out
