"""A loaded version as the server holds it, and the LRU cache of them.

``ServedModel`` is everything a request needs, built once when the version loads: its signature
(what it accepts and returns), its runner (batcher or direct), its statistics with their metric
label children, and its label and version string. Zoo models are tensors in, tensors out; other
kinds (text encoders, generative models) bring their own signature and forward.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from maas import jit
from maas.compression.quant import Int8Linear
from maas.errors import InvalidArgument, ResourceExhausted
from maas.events import clip
from services.inference.batcher import BatchingConfig, Forward, Runner
from services.inference.metrics import ModelStats
from services.inference.signature import Signature

log = logging.getLogger(__name__)

# Archs whose forward is a fixed sequence of tensor operations for any number of rows: a trace
# taken on one row replays for every batch (their reshapes read the row count from the input).
TRACEABLE_ARCHS = frozenset({"mlp", "cnn", "sequential"})
# Row counts a trace is checked on, against the module itself, before it is used.
TRACE_CHECK_ROWS = (1, 3, 64)


@dataclass
class ServedModel:
    name: str
    version: int
    signature: Signature
    nbytes: int
    runner: Runner
    stats: ModelStats
    platform: str = "pytorch"
    module: nn.Module | None = None  # the loaded module itself (generation decodes with it)
    batching: BatchingConfig = field(default_factory=BatchingConfig)  # what its runner does
    version_text: str = field(init=False)  # as responses carry it
    label: str = field(init=False)  # as messages name it

    def __post_init__(self) -> None:
        self.version_text = str(self.version)
        self.label = f"model {self.name!r} version {self.version}"


def weights_nbytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def torch_forward(
    module: nn.Module,
    *,
    trace_row: tuple[int, ...] | None = None,
    pass_rows: int | None = None,
) -> Forward:
    """Rows in, rows out. With ``trace_row`` (the shape of one input row) the pass runs as a
    TorchScript trace of the module when that trace gives the module's own outputs bit for bit
    (``traced``): one call into C++ instead of Python for every layer, which was a third of a
    small MLP's forward (32 -> 20 us for a row). With ``pass_rows`` (only for a module whose
    rows are independent) more rows than that are computed in passes of that many, so one
    large request holds one pass's activations at a time, not a million rows' (a 256 MB
    request's forward peaked near 900 MB)."""
    runnable = module if trace_row is None else traced(module, trace_row)

    def one_pass(rows: np.ndarray) -> np.ndarray:
        out: np.ndarray = runnable(torch.from_numpy(rows)).float().numpy()
        return out

    def in_passes(rows: np.ndarray, size: int) -> np.ndarray:
        first = one_pass(rows[:size])
        out = np.empty((len(rows), *first.shape[1:]), dtype=first.dtype)
        out[:size] = first
        for start in range(size, len(rows), size):
            out[start : start + size] = one_pass(rows[start : start + size])
        return out

    def forward(rows: np.ndarray) -> np.ndarray:
        try:
            with torch.inference_mode():
                if pass_rows is not None and len(rows) > pass_rows:
                    return in_passes(rows, pass_rows)
                return one_pass(rows)
        except MemoryError:
            raise ResourceExhausted(
                f"no memory for a forward pass of {len(rows)} rows; send fewer rows a request"
            ) from None
        except (RuntimeError, IndexError) as exc:
            # Shapes and datatypes were checked before queueing: what fails here is the values
            # (int8 scaling overflowing on huge numbers, say), or memory for this many rows.
            # One line, not a traceback: any caller can send such input, as often as it likes.
            reason = failure_reason(exc)
            log.info("forward pass failed on a request's input: %s", reason)
            log.debug("the failed forward pass", exc_info=True)
            if "allocate" in reason:
                raise ResourceExhausted(
                    f"no memory for this forward pass ({reason}); send fewer rows a request"
                ) from None
            if "Quantiz" in reason:
                reason += (
                    "; this model computes in int8 and cannot scale values this large: send "
                    "values in the range it was trained on, or call an fp32 version"
                )
            raise InvalidArgument(f"the model cannot compute this input: {reason}") from None

    return forward


def failure_reason(exc: BaseException) -> str:
    """What failed, in a line. A TorchScript error's first line only says the interpreter
    failed ("The following operation failed in the TorchScript interpreter."); the error it
    carries is its last line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    last = lines[-1] if "TorchScript interpreter" in lines[0] else lines[0]
    return clip(last.removeprefix("RuntimeError: "), 300)


def rows_independent(module: nn.Module) -> bool:
    """Whether each output row depends on its own input row only, so requests may share a
    forward pass. Not under int8 dynamic quantization: it scales activations by the whole
    pass's range, so one caller's values would change another's results."""
    return not any(isinstance(m, Int8Linear) for m in module.modules())


def traced(module: nn.Module, row: tuple[int, ...]) -> nn.Module:
    """``module`` traced on one row of shape ``row``, or ``module`` itself where the trace
    fails or differs from it on any of ``TRACE_CHECK_ROWS`` rows (control flow the trace froze,
    an operation it cannot record)."""
    generator = torch.Generator().manual_seed(0)
    try:
        with torch.no_grad():
            trace = jit.trace(module, torch.randn(1, *row, generator=generator))
            for rows in TRACE_CHECK_ROWS:
                x = torch.randn(rows, *row, generator=generator)
                if not torch.equal(trace(x), module(x)):
                    raise ValueError(f"its output for {rows} rows differs from the module's")
    except Exception as exc:  # any failure: the module itself serves, as it always can
        log.warning("serving %s without a trace (%s)", type(module).__name__, exc)
        return module
    return trace


class ModelCache:
    """LRU of served versions bounded by the bytes they hold (``ServedModel.nbytes``: weights, and
    a GPT's decode cache).

    The newest entry always stays, even alone over the budget: a model bigger than the cache is
    still servable, just never kept beside another.
    """

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self._models: OrderedDict[tuple[str, int], ServedModel] = OrderedDict()
        self.total_bytes = 0

    def get(self, name: str, version: int) -> ServedModel | None:
        model = self._models.get((name, version))
        if model is not None:
            self._models.move_to_end((name, version))
        return model

    def touch(self, model: ServedModel) -> None:
        """Mark ``model`` as just used (it must be in the cache)."""
        self._models.move_to_end((model.name, model.version))

    def put(self, model: ServedModel) -> list[ServedModel]:
        """Insert ``model`` and return what was evicted to make room."""
        key = (model.name, model.version)
        evicted = [m for m in [self._models.pop(key, None)] if m is not None]
        self._models[key] = model
        self.total_bytes += model.nbytes - sum(m.nbytes for m in evicted)
        while self.total_bytes > self.capacity_bytes and len(self._models) > 1:
            _, oldest = self._models.popitem(last=False)
            self.total_bytes -= oldest.nbytes
            evicted.append(oldest)
        return evicted

    def remove(self, keep: Callable[[ServedModel], bool]) -> list[ServedModel]:
        gone = [m for m in self._models.values() if not keep(m)]
        for m in gone:
            del self._models[(m.name, m.version)]
            self.total_bytes -= m.nbytes
        return gone

    def __iter__(self) -> Iterator[ServedModel]:
        return iter(list(self._models.values()))

    def __len__(self) -> int:
        return len(self._models)
