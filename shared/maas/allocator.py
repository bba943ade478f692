"""The C allocator of processes that allocate and free megabytes every training step.

glibc's malloc adapts two thresholds as a process runs: blocks above the mmap threshold get
pages of their own, and free memory above the trim threshold at the top of a heap goes back to
the kernel. A gradient worker keeps every push until a checkpoint covers it, so its heaps grow
step after step, and the step's own temporaries (activations, gradients, frames) land at their
top: each free trimmed them and the next step faulted the same megabytes in again. Measured
on bench.train's MLP (2 workers x 2 shards, 2 cores): the steps before the first checkpoint ran
at 13 a second instead of 35 (12 000-25 000 page faults a second in each worker), then at full
speed once the checkpoint let the pushes go. Fixed thresholds keep freed memory in the process
for the next step instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

# mallopt(3) parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Blocks up to 32 MiB (glibc's largest mmap threshold on 64-bit) come from the heaps, where a
# freed block is reused; memory returns to the kernel only once 1 GiB at a heap's top is free.
MMAP_THRESHOLD_BYTES = 32 << 20
TRIM_THRESHOLD_BYTES = 1 << 30


def keep_freed_memory() -> bool:
    """Fix glibc's thresholds so freed blocks stay for reuse; False where the C library is not
    glibc (musl has no such thresholds) and nothing changed."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    # mallopt returns 1 on success; musl's stub returns 0 and changes nothing.
    kept = (
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
        and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
    )
    if not kept:
        log.info("the C library ignores malloc thresholds; freed memory may be trimmed")
    return kept
