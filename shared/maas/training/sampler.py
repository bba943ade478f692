"""Which rows a worker trains on at each step: a pure function of (seed, worker, step).

Each worker walks its own shard of the training rows in a seeded permutation per epoch, taking
consecutive ``batch_size`` slices and wrapping into the next epoch's permutation. Because the batch
depends only on the step, a restarted worker picks up exactly where the job is, and the local
reference trainer sees the same batches as the distributed run.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

from maas.errors import InvalidArgument

# Permutations kept for reuse, in bytes (8 a row). A worker needs one or two at a time (a batch
# may straddle an epoch), a process running several workers (the local reference trainer) one
# or two each; a count bound alone held 64 of them, ~5 GB for a 10 M-row dataset, kept after
# the job ended.
CACHE_BYTES = 256 * 1024 * 1024

PermutationKey = tuple[int, int, int, int]  # rows, seed, worker, epoch


class Permutations:
    """The seeded permutations in use, least recently used dropped first once they hold more
    than ``budget`` bytes (the newest is always kept). Thread-safe."""

    def __init__(self, budget: int = CACHE_BYTES) -> None:
        self.budget = budget
        self.held_bytes = 0
        self._held: OrderedDict[PermutationKey, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, rows: int, seed: int, worker: int, epoch: int) -> np.ndarray:
        key = (rows, seed, worker, epoch)
        with self._lock:
            if key in self._held:
                self._held.move_to_end(key)
                return self._held[key]
        perm = np.random.default_rng([seed, worker, epoch]).permutation(rows)
        perm.flags.writeable = False  # shared through the cache
        with self._lock:
            if key not in self._held:  # another thread may have made it meanwhile
                self._held[key] = perm
                self.held_bytes += perm.nbytes
            while self.held_bytes > self.budget and len(self._held) > 1:
                _, dropped = self._held.popitem(last=False)
                self.held_bytes -= dropped.nbytes
            return self._held.get(key, perm)


_PERMUTATIONS = Permutations()


def batch_indices(
    rows: int,
    batch_size: int,
    step: int,
    *,
    seed: int,
    worker: int,
    permutations: Permutations = _PERMUTATIONS,
) -> np.ndarray:
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
        out[mask] = permutations.get(rows, seed, worker, int(epoch))[within[mask]]
    return out
