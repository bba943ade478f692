"""The inference core, independent of gRPC: which version serves a request, and running it.

A request names a model and optionally a version: nothing means the alias ``production``, digits
mean a version number, anything else is an alias. Aliases resolve through the registry once and
are then kept in an alias table that registry events update (hot swap): on ``alias-set`` the new
version is loaded in the background and the table entry flips to it in one assignment, so a
request either got the old version (and finishes on it) or the new one, and none waits for or
fails because of the swap.

Loaded versions live in an LRU cache bounded in bytes of weights. Artifacts are fetched by a
``ModelSource`` (registry + S3 in production, a fake in unit tests) and verified against their
manifest's sha256 before they are turned into a module, on the worker pool.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
from torch import nn

from maas import artifacts
from maas.errors import InvalidArgument, NotFound
from services.inference.batcher import BatchingConfig, Forward, Runner, make_runner
from services.inference.metrics import Metrics, ModelStats
from services.inference.signature import Signature
from services.inference.text import is_text, text_parts

log = logging.getLogger(__name__)

DEFAULT_ALIAS = "production"
T = TypeVar("T")


class ModelSource(Protocol):
    """Where versions come from: alias resolution and verified-on-arrival artifact bytes."""

    async def resolve(self, name: str, alias: str) -> int:
        """The version ``alias`` points at; NotFound when the model or alias is unknown."""
        ...

    async def fetch(self, name: str, version: int) -> tuple[artifacts.Manifest, dict[str, bytes]]:
        """The manifest and files of one version; NotFound when it does not exist."""
        ...


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

    @property
    def label(self) -> str:
        return f"model {self.name!r} version {self.version}"


def parse_ref(version: str) -> tuple[int | None, str]:
    """``model_version`` -> (version number, None) or (None, alias)."""
    version = version.strip()
    if version.isdigit():
        return int(version), ""
    return None, version or DEFAULT_ALIAS


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


@dataclass
class InferResult:
    model: ServedModel
    outputs: dict[str, np.ndarray] = field(default_factory=dict)


class DataPlane:
    def __init__(
        self,
        source: ModelSource,
        executor: Executor,
        *,
        batching: BatchingConfig,
        cache_bytes: int,
        metrics: Metrics | None = None,
        inline_forward_us: int = 0,
    ) -> None:
        self._source = source
        self._executor = executor
        self._batching = batching
        self._inline_forward_us = inline_forward_us
        self._metrics = metrics or Metrics()
        self._cache = ModelCache(cache_bytes)
        self._aliases: dict[tuple[str, str], int] = {}
        # Bumped on every registry event for an alias; a resolution or background load that
        # started under an older generation must not overwrite what the event decided.
        self._alias_gen: dict[tuple[str, str], int] = {}
        self._inflight: dict[tuple[Any, ...], asyncio.Task[Any]] = {}
        self._background: set[asyncio.Task[None]] = set()
        self.ready = False

    # --- resolving and loading --------------------------------------------------------------

    async def model(self, name: str, version: str = "") -> ServedModel:
        """The served version for a request's ``model_name`` and ``model_version``."""
        if not name:
            raise InvalidArgument("model_name is empty; name the model to use")
        number, alias = parse_ref(version)
        if number is None:
            number = self._aliases.get((name, alias))
            if number is None:
                number = await self._resolve(name, alias)
        cached = self._cache.get(name, number)
        if cached is not None:
            return cached
        return await self._single_flight(("load", name, number), lambda: self._load(name, number))

    async def _resolve(self, name: str, alias: str) -> int:
        key = (name, alias)
        gen = self._alias_gen.get(key, 0)
        # The generation is part of the key: a caller arriving after an alias event must not
        # join (and then cache) a lookup that started before it.
        number = await self._single_flight(
            ("resolve", name, alias, gen), lambda: self._source.resolve(name, alias)
        )
        if self._alias_gen.get(key, 0) == gen:
            self._aliases[key] = number
        return number

    async def _single_flight(
        self, key: tuple[Any, ...], make: Callable[[], Coroutine[Any, Any, T]]
    ) -> T:
        """Concurrent callers with the same key share one call (one registry hit, one load).

        The call runs as its own task, so a caller that gives up (client cancelled, deadline)
        does not cancel it for the others.
        """
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(make())
            self._inflight[key] = task
            task.add_done_callback(lambda done: self._settled(key, done))
        return await asyncio.shield(task)  # type: ignore[no-any-return]

    def _settled(self, key: tuple[Any, ...], task: asyncio.Task[Any]) -> None:
        del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved here: every waiter may have given up already

    async def _load(self, name: str, version: int) -> ServedModel:
        manifest, files = await self._source.fetch(name, version)
        loop = asyncio.get_running_loop()
        # Verifying sha256 and building the module is CPU work: keep it off the event loop.
        module = await loop.run_in_executor(self._executor, artifacts.materialize, manifest, files)
        stats = ModelStats(name, version, self._metrics)
        signature, forward = (
            Signature.for_zoo(manifest.arch, manifest.config),
            torch_forward(module),
        )
        if is_text(manifest):  # strings in, tokenized here (services.inference.text)
            signature, forward = await text_parts(manifest, files, module, self._source)
        model = ServedModel(
            name=name,
            version=version,
            signature=signature,
            nbytes=weights_nbytes(module),
            runner=make_runner(
                forward,
                self._executor,
                self._batching,
                stats,
                inline_max_us=self._inline_forward_us,
            ),
            stats=stats,
            module=module,
        )
        self._forget(self._cache.put(model))
        log.info("loaded %s (%d bytes of weights)", model.label, model.nbytes)
        return model

    def _forget(self, evicted: Sequence[ServedModel]) -> None:
        for gone in evicted:
            gone.stats.forget()
            log.info("evicted %s", gone.label)
        self._metrics.loaded_models.set(len(self._cache))
        self._metrics.loaded_bytes.set(self._cache.total_bytes)

    # --- requests ---------------------------------------------------------------------------

    async def model_ready(self, name: str, version: str = "") -> bool:
        try:
            await self.model(name, version)
        except NotFound:
            return False
        return True

    async def infer(
        self,
        name: str,
        version: str,
        inputs: Mapping[str, np.ndarray],
        requested: Sequence[str] = (),
    ) -> InferResult:
        model = await self.model(name, version)
        rows = model.signature.check_inputs(inputs, model=model.label)
        model.signature.check_outputs(requested, model=model.label)
        started = time.perf_counter_ns()
        try:
            output = await model.runner.submit(rows)
        except BaseException:
            model.stats.request_done(ok=False, rows=len(rows), ns=time.perf_counter_ns() - started)
            raise
        model.stats.request_done(ok=True, rows=len(rows), ns=time.perf_counter_ns() - started)
        return InferResult(model, model.signature.outputs_of(output))

    # --- repository -------------------------------------------------------------------------

    def loaded(self) -> list[ServedModel]:
        return list(self._cache)

    def unload(self, name: str) -> int:
        """Drop every cached version and alias of ``name``; the next request loads afresh."""
        for key in [k for k in self._aliases if k[0] == name]:
            self._drop_alias(key)
        gone = self._cache.remove(lambda m: m.name != name)
        self._forget(gone)
        return len(gone)

    # --- registry events (hot swap) ---------------------------------------------------------

    async def on_model_event(self, event: Mapping[str, Any]) -> None:
        """Apply one ``maas.model/1`` event; slow work (loading) happens in the background."""
        kind, name = event["event"], event["name"]
        if kind == "alias-set":
            self._alias_set(name, event["alias"], int(event["version"]))
        elif kind == "alias-deleted":
            self._drop_alias((name, event["alias"]))
        elif kind == "deleted":
            version = event.get("version")
            for key, number in list(self._aliases.items()):
                if key[0] == name and (version is None or number == version):
                    self._drop_alias(key)
            self._forget(
                self._cache.remove(
                    lambda m: m.name != name or (version is not None and m.version != version)
                )
            )

    def _bump(self, key: tuple[str, str]) -> int:
        self._alias_gen[key] = self._alias_gen.get(key, 0) + 1
        return self._alias_gen[key]

    def _drop_alias(self, key: tuple[str, str]) -> None:
        self._bump(key)
        self._aliases.pop(key, None)

    def _alias_set(self, name: str, alias: str, version: int) -> None:
        key = (name, alias)
        gen = self._bump(key)
        current = self._aliases.get(key)
        if current is None or current == version:
            return  # not served here (the next request resolves afresh) or already there
        task = asyncio.get_running_loop().create_task(self._swap(key, version, gen))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _swap(self, key: tuple[str, str], version: int, gen: int) -> None:
        name, alias = key
        try:
            await self.model(name, str(version))
        except Exception as exc:
            # Keep answering with the version that works; the failed one is logged and counted.
            log.error("not swapping %s@%s to version %d: %s", name, alias, version, exc)
            self._metrics.swaps.labels(name, "failed").inc()
            return
        if self._alias_gen.get(key) == gen:
            previous = self._aliases.get(key)
            self._aliases[key] = version
            self._metrics.swaps.labels(name, "ok").inc()
            log.info("swapped %s@%s: version %s -> %d", name, alias, previous, version)

    async def wait_background(self) -> None:
        """Let in-progress swaps finish (tests and shutdown)."""
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    async def close(self) -> None:
        self.ready = False
        for task in list(self._background):
            task.cancel()
        await self.wait_background()
