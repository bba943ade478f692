"""A service process lifts its soft open-files limit, so idle clients cannot starve it of files."""

from __future__ import annotations

import os
import resource
import subprocess
import sys

import pytest

LOW = 256
SCRIPT = f"""
import resource, socket
from maas.lifecycle import raise_open_files_limit
raise_open_files_limit()
held = [socket.socket() for _ in range({LOW + 100})]  # more files than the old soft limit
print(*resource.getrlimit(resource.RLIMIT_NOFILE))
"""


def _started_with_a_low_soft_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (LOW, hard))


@pytest.mark.skipif(
    resource.getrlimit(resource.RLIMIT_NOFILE)[1] <= LOW + 200, reason="the hard limit is too low"
)
def test_the_soft_limit_rises_to_the_hard_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)

    done = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        preexec_fn=_started_with_a_low_soft_limit,
        capture_output=True,
        text=True,
        env=os.environ,
        timeout=60,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    soft_after, hard_after = (int(n) for n in done.stdout.split())
    assert (soft_after, hard_after) == (hard, hard)
