"""What the data-plane tests share: a counting in-memory registry, models, requests."""

import asyncio
from collections import defaultdict

import numpy as np
import torch

from maas import zoo
from services.inference.batcher import BatchingConfig
from services.inference.dataplane import DataPlane
from services.inference.sources import MemorySource

MLP = {"in_features": 64, "hidden": [32], "num_classes": 10}


class CountingSource(MemorySource):
    """Counts registry hits and can hold a version's fetch until released."""

    def __init__(self) -> None:
        super().__init__()
        self.resolves = 0
        self.fetches: list[int] = []
        self.gates: dict[int, asyncio.Event] = {}
        self.held: defaultdict[int, asyncio.Event] = defaultdict(asyncio.Event)
        self.answer_sent = asyncio.Event()
        self.answer_sent.set()
        self.waiting = 0  # resolutions that read their answer and wait for answer_sent

    async def resolve(self, name, alias):
        self.resolves += 1
        version = await super().resolve(name, alias)
        # The answer is on its way back: concurrent callers pile up, events may overtake it.
        await asyncio.sleep(0)
        self.waiting += 1
        await self.answer_sent.wait()
        return version

    async def fetch(self, name, version):
        self.fetches.append(version)
        if version in self.gates:
            self.held[version].set()
            await self.gates[version].wait()
        return await super().fetch(name, version)


def model(seed: int) -> torch.nn.Module:
    return zoo.build("mlp", MLP, seed=seed).eval()


def expected(module: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return module(torch.from_numpy(x)).numpy()


X = np.random.default_rng(7).standard_normal((3, 64)).astype(np.float32)


def digits_source() -> CountingSource:
    """Versions 1 (production) and 2 (staging) of ``digits``."""
    src = CountingSource()
    src.add("digits", model(1), "mlp", MLP, aliases=["production"])
    src.add("digits", model(2), "mlp", MLP, aliases=["staging"])
    return src


def make_plane(source, pool, *, cache_bytes=1 << 30, metrics=None, batching=None, **options):
    return DataPlane(
        source,
        pool,
        batching=batching or BatchingConfig(8, 0),
        cache_bytes=cache_bytes,
        metrics=metrics,
        **options,
    )


async def answer(plane, version="", x=X):
    result = await plane.infer("digits", version, {"input": x})
    return result.model.version, result.outputs["output"]


def assert_from(output, module):
    np.testing.assert_allclose(output, expected(module, X), rtol=1e-5, atol=1e-6)
