"""A loaded version as the server holds it, and the LRU cache of them.

``ServedModel`` is everything a request needs, built once when the version loads: its signature
(what it accepts and returns), its runner (batcher or direct), its statistics with their metric
label children, and its label and version string. Zoo models are tensors in, tensors out; other
kinds (text encoders, generative models) bring their own signature and forward.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from services.inference.batcher import Forward, Runner
from services.inference.metrics import ModelStats
from services.inference.signature import Signature


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
    version_text: str = field(init=False)  # as responses carry it
    label: str = field(init=False)  # as messages name it

    def __post_init__(self) -> None:
        self.version_text = str(self.version)
        self.label = f"model {self.name!r} version {self.version}"


def weights_nbytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def torch_forward(module: nn.Module) -> Forward:
    def forward(rows: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out: np.ndarray = module(torch.from_numpy(rows)).float().numpy()
        return out

    return forward


class ModelCache:
    """LRU of served versions bounded by their weights' bytes.

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
