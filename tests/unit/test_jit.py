"""maas.jit: TorchScript without its deprecation notices, and nothing else hidden.

The notices are filtered from import on, process-wide; pytest resets the filters around each
test, so these run in a fresh interpreter, as a service imports and uses the module.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch
from torch import nn

from maas import jit


def run_with_future_warnings_as_errors(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-W", "error::FutureWarning", "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_scripting_and_tracing_raise_no_deprecation_notice():
    done = run_with_future_warnings_as_errors(
        """
        import torch
        from maas import jit
        jit.script(torch.nn.ReLU())
        jit.trace(torch.nn.Linear(3, 2), torch.randn(1, 3))
        """
    )
    assert done.returncode == 0, done.stderr


def test_other_future_warnings_still_show():
    done = run_with_future_warnings_as_errors(
        """
        import warnings
        from maas import jit
        warnings.warn("`thing` is deprecated", FutureWarning)
        """
    )
    assert done.returncode != 0 and "`thing` is deprecated" in done.stderr


def test_the_scripted_module_computes_as_the_module():
    class Doubling(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2

    x = torch.randn(4, 3)
    assert torch.equal(jit.script(Doubling())(x), x * 2)
