"""TorchScript where the platform uses it (a GPT's decode pass, a served zoo model's trace),
without its notices in the logs, thread-safely.

torch warns (FutureWarning) on every ``torch.jit.script`` and ``torch.jit.trace`` call that
TorchScript is deprecated; each caller keeps an eager fallback for the day it goes.
``warnings.catch_warnings`` around the call would hide the notice but swaps the process's filter
list, which is not thread-safe (models load on executor threads). Filters installed once at
import, matching those notices alone, are. Tracer warnings (a Python value frozen into a trace)
are hidden too: every trace the platform keeps is first checked against the module's outputs.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

warnings.filterwarnings(
    "ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning
)
warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)


def script(module: nn.Module) -> nn.Module:
    """``torch.jit.script(module)``; raises what TorchScript raises when it cannot compile it."""
    return torch.jit.script(module)  # type: ignore[no-any-return]


def trace(module: nn.Module, example: torch.Tensor) -> nn.Module:
    """``torch.jit.trace(module, example)``: the operations one call on ``example`` ran."""
    return torch.jit.trace(module, example)  # type: ignore[no-any-return]
