"""maas.allocator: freed megabytes stay in the process for the next step instead of being
returned to the kernel and faulted in again (each case runs in a fresh interpreter, whose
allocator has seen nothing yet)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc thresholds")

PROBE = textwrap.dedent(
    """
    import json, resource, sys
    import numpy as np
    from maas.allocator import keep_freed_memory

    kept = keep_freed_memory() if sys.argv[1] == "keep" else None

    def faults(make):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        make()
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    def step():  # a step's temporaries: 16 blocks of 4 MB, written, then freed
        blocks = [np.ones(1 << 20, dtype=np.float32) for _ in range(16)]
        del blocks

    first = faults(step)
    print(json.dumps({"kept": kept, "first": first, "again": [faults(step) for _ in range(3)]}))
    """
)


def probe(mode: str) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=60, check=True
    )
    result: dict[str, object] = json.loads(done.stdout)
    return result


def test_glibc_takes_the_fixed_thresholds() -> None:
    assert probe("keep")["kept"] is True


def test_a_steps_freed_blocks_are_reused_by_the_next_step_without_faulting_in_again() -> None:
    kept = probe("keep")
    first = kept["first"]
    assert isinstance(first, int) and first > 1000, kept  # the first step faulted its 64 MB in
    assert all(n < first // 10 for n in kept["again"]), kept  # later steps reuse them


def test_without_it_glibc_gives_freed_blocks_back_and_faults_them_in_again() -> None:
    # The behaviour keep_freed_memory exists to stop: a step after the first faults again.
    default = probe("default")
    first = default["first"]
    assert isinstance(first, int) and default["again"][0] > first // 2, default
