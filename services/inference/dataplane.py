"""The inference core, independent of gRPC and HTTP: which version serves a request, and running it.

A request names a model and optionally a version: digits mean a version number, anything else
an alias, and nothing means the registry's unversioned resolution (the ``production`` alias if
set, else the newest version a training, fine-tuning or import made). Each resolution is made
through the registry once and kept in an alias table that registry events keep current (hot
swap): when an event may move what an alias or the bare name points at, the new version is
loaded in the background and the table entry flips to it in one assignment, so a request either
got the old version (and finishes on it) or the new one, and none waits for or fails because of
the swap.

Per request the work is one lookup: the served version for each (name, version string) a request
used is remembered until an event for that name, an eviction or an unload forgets it.

Loaded versions live in an LRU cache bounded in bytes of weights. Artifacts are fetched by a
``ModelSource`` (registry + S3 in production, a fake in unit tests), verified against their
manifest's sha256 and built into a served model on the worker pool
(``services.inference.loading``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from maas.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable, is_retriable
from maas.names import check_name, version_number
from services.inference.admission import InflightBytes, MiB
from services.inference.batcher import BatchingConfig
from services.inference.canary import Splits, split_of
from services.inference.loading import ModelLoader, ModelSource
from services.inference.metrics import Metrics
from services.inference.served import ModelCache, ServedModel

log = logging.getLogger(__name__)

DEFAULT_WAIT_S = 60.0  # MAAS_INFERENCE_LOAD_WAIT_S
DEFAULT_INFLIGHT_BYTES = 1 << 30  # MAAS_INFERENCE_MAX_INFLIGHT_BYTES
DEFAULT_MAX_ANSWER_BYTES = 256 << 20  # MAAS_GRPC_MAX_MESSAGE_BYTES
# A swap that failed for a reason that can pass is tried again after 1, 2, 4 ... 30 s.
SWAP_RETRY_FIRST_S = 1.0
SWAP_RETRY_MAX_S = 30.0
DEFAULT = ""  # the alias-table key of a bare name: the registry's unversioned resolution
T = TypeVar("T")
AliasKey = tuple[str, str]  # (name, alias or DEFAULT)


@dataclass(frozen=True)
class CatalogueEntry:
    name: str
    version: int
    state: str  # READY (loaded here) or UNAVAILABLE (not loaded)
    reason: str = ""


def parse_ref(version: str) -> tuple[int | None, str]:
    """``model_version`` -> (version number, "") or (None, alias); ("", DEFAULT) when empty."""
    version = version.strip()
    number = version_number(version, what="model_version")
    return (number, "") if number is not None else (None, version)


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
        instances: int = 1,
        wait_s: float = DEFAULT_WAIT_S,
        inflight: InflightBytes | None = None,
        max_answer_bytes: int = DEFAULT_MAX_ANSWER_BYTES,
    ) -> None:
        self._source = source
        self._max_answer_bytes = max_answer_bytes
        self._inflight_bytes = inflight or InflightBytes(DEFAULT_INFLIGHT_BYTES)
        self._wait_s = wait_s  # longest a request waits on a registry lookup or a load
        self.instances = instances  # forward passes that can run at once (worker threads)
        self._metrics = metrics or Metrics()
        self._loader = ModelLoader(
            source,
            executor,
            batching=batching,
            metrics=self._metrics,
            inline_forward_us=inline_forward_us,
        )
        self._cache = ModelCache(cache_bytes)
        self._aliases: dict[AliasKey, int] = {}
        # Bumped on every registry event for an alias; a resolution or background load that
        # started under an older generation must not overwrite what the event decided.
        self._alias_gen: dict[AliasKey, int] = {}
        # name -> {model_version as requested -> the version serving it}
        self._serving: dict[str, dict[str, ServedModel]] = {}
        self._inflight: dict[tuple[Any, ...], asyncio.Task[Any]] = {}
        self._background: set[asyncio.Task[None]] = set()
        self.splits = Splits()  # weighted aliases (services.inference.canary)
        self.ready = False
        # Called with each version as it is loaded (a first request, or an alias moving to it),
        # and as it leaves (evicted from the cache, or unloaded by request).
        self.on_loaded: list[Callable[[ServedModel], None]] = []
        self.on_unloaded: list[Callable[[ServedModel], None]] = []
        # What a version holds beside its weights (services.inference.loading.ModelLoader).
        self.held_beside_weights = self._loader.held_beside_weights

    @property
    def cache_capacity_bytes(self) -> int:
        return self._cache.capacity_bytes

    # --- resolving and loading --------------------------------------------------------------

    async def model(self, name: str, version: str = "", routing_key: str = "") -> ServedModel:
        """The served version for a request's ``model_name`` and ``model_version`` (a split
        alias: drawn by weight, sticky by ``routing_key``)."""
        refs = self._serving.get(name)
        if refs is not None:
            served = refs.get(version)
            if served is not None:
                self._cache.touch(served)
                return served
        if not name:
            raise InvalidArgument("model_name is empty; name the model to use")
        number, alias = parse_ref(version)
        key = None
        if number is None:
            key = (name, alias)
            number = self._aliases.get(key) or await self._resolve(key)
            number = self.splits.pick(key, number, routing_key)
        served = self._cache.get(name, number)
        if served is None:
            served = await self._single_flight(
                ("load", name, number),
                lambda: self._load(name, number),
                f"loading model {name!r} version {number}",
            )
        # Remembered only while still true (an event or an eviction may have come meanwhile),
        # and only as spelled canonically: " 1" or "01" must not grow the table without bound.
        canonical = version == (alias if key is not None else str(number))
        if (
            canonical
            and (
                key is None or (self._aliases.get(key) == number and not self.splits.weighted(key))
            )
            and self._cache.get(name, number) is served
        ):
            self._serving.setdefault(name, {})[version] = served
        return served

    async def _resolve(self, key: AliasKey) -> int:
        name, alias = key
        gen = self._alias_gen.get(key, 0)
        # The generation is part of the key: a caller arriving after an alias event must not
        # join (and then cache) a lookup that started before it.
        number = await self._single_flight(
            ("resolve", name, alias, gen),
            lambda: self._source.resolve(name, alias),
            f"looking up model {name!r}" + (f" alias {alias!r}" if alias else ""),
        )
        split = await split_of(self._source, name, alias)
        if self._alias_gen.get(key, 0) == gen:
            self.splits.set(key, split)
            self._point(key, number)
        return number

    def _point(self, key: AliasKey, number: int) -> None:
        if self._aliases.get(key) != number:
            self._aliases[key] = number
            self._serving.pop(key[0], None)

    async def _single_flight(
        self, key: tuple[Any, ...], make: Callable[[], Coroutine[Any, Any, T]], what: str
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
        try:
            async with asyncio.timeout(self._wait_s):
                return await asyncio.shield(task)  # type: ignore[no-any-return]
        except TimeoutError:
            # A frozen S3 server or registry would hold the request as long as the store's own
            # retries last (minutes); the call goes on for whoever asks next.
            raise Unavailable(
                f"{what} took over {self._wait_s:g} s (MAAS_INFERENCE_LOAD_WAIT_S): the registry "
                "or S3 is slow or unreachable; it goes on in the background, try again shortly"
            ) from None

    def _settled(self, key: tuple[Any, ...], task: asyncio.Task[Any]) -> None:
        del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved here: every waiter may have given up already

    async def _load(self, name: str, version: int) -> ServedModel:
        model = await self._loader.load(name, version)
        self._metrics.loads.labels(name).inc()
        self._forget(self._cache.put(model), evicted=True)
        log.info("loaded %s (%d bytes, weights and decode cache)", model.label, model.nbytes)
        for loaded in self.on_loaded:
            loaded(model)
        return model

    def _forget(self, dropped: Sequence[ServedModel], *, evicted: bool = False) -> None:
        """Versions out of the cache (their counters are the callers' to keep or drop)."""
        for gone in dropped:
            self._serving.pop(gone.name, None)
            gone.stats.forget_queue()
            if evicted:
                self._metrics.evictions.labels(gone.name).inc()
            log.info("%s %s", "evicted" if evicted else "unloaded", gone.label)
            for unloaded in self.on_unloaded:
                unloaded(gone)
        self._metrics.loaded_models.set(len(self._cache))
        self._metrics.loaded_bytes.set(self._cache.total_bytes)

    # --- requests ---------------------------------------------------------------------------

    async def model_ready(self, name: str, version: str = "") -> bool:
        """Whether a request for it would be served: not for a model that does not exist or
        whose artifact no server can build (as Triton answers for a model that failed to load;
        ModelInfer and ModelMetadata say why)."""
        try:
            await self.model(name, version)
        except (NotFound, FailedPrecondition):
            return False
        return True

    async def infer(
        self,
        name: str,
        version: str,
        inputs: Mapping[str, np.ndarray],
        requested: Sequence[str] = (),
        routing_key: str = "",
    ) -> InferResult:
        model = await self.model(name, version, routing_key)
        rows = model.signature.check_inputs(inputs, model=model.label)
        model.signature.check_outputs(requested, model=model.label)
        answer = self._check_answer(model, len(rows))
        started = time.perf_counter_ns()
        held = rows.nbytes + answer
        self._inflight_bytes.take(held)
        try:
            output = await model.runner.submit(rows)
        except BaseException:
            model.stats.request_done(ok=False, rows=len(rows), ns=time.perf_counter_ns() - started)
            raise
        finally:
            self._inflight_bytes.give(held)
        model.stats.request_done(ok=True, rows=len(rows), ns=time.perf_counter_ns() - started)
        return InferResult(model, model.signature.outputs_of(output))

    def _check_answer(self, model: ServedModel, rows: int) -> int:
        """The answer's bytes, refused before any computing when they could not be sent: a
        model's output can be hundreds of times its input (a GPT's logits are 257 floats per
        input token), so a small request could otherwise hold gigabytes, then fail to send."""
        per_row = model.signature.answer_row_bytes
        answer = rows * per_row
        if answer > self._max_answer_bytes:
            raise InvalidArgument(
                f"{rows} rows make an answer of {answer / MiB:.1f} MiB from {model.label} "
                f"({per_row} bytes a row), over the {self._max_answer_bytes / MiB:.0f} MiB a "
                f"message may carry (MAAS_GRPC_MAX_MESSAGE_BYTES): send at most "
                f"{self._max_answer_bytes // per_row} rows a request"
            )
        return answer

    # --- repository -------------------------------------------------------------------------

    def loaded(self) -> list[ServedModel]:
        return list(self._cache)

    async def catalogue(self, *, ready_only: bool = False) -> list[CatalogueEntry]:
        """Loaded versions (READY), then, unless ``ready_only``, the source's other models."""
        entries = [CatalogueEntry(m.name, m.version, "READY") for m in self._cache]
        if not ready_only:
            loaded = {(e.name, e.version) for e in entries}
            entries += [
                CatalogueEntry(name, version, "UNAVAILABLE", "not loaded; a request loads it")
                for name, version in await self._source.catalogue()
                if (name, version) not in loaded
            ]
        return sorted(entries, key=lambda e: (e.name, e.version))

    def unload(self, name: str) -> int:
        """Drop every cached version and alias of ``name``; the next request loads afresh. A
        name that is not loaded is nothing to do; one no model could have is refused, as load
        refuses it."""
        check_name(name, what="model_name")
        for key in [k for k in self._aliases if k[0] == name]:
            self._drop_alias(key)
        gone = self._cache.remove(lambda m: m.name != name)
        self._forget(gone)
        self._metrics.forget_model(name)
        return len(gone)

    # --- registry events (hot swap) ---------------------------------------------------------

    async def on_model_event(self, event: Mapping[str, Any]) -> None:
        """Apply one ``maas.model/1`` event; slow work (loading) happens in the background.

        An event says what changed, never what to serve: a moved alias is looked up in the
        registry again, and what a deletion names is forgotten here for the next request to
        resolve afresh. A record on the topic proves nothing (whoever may write the topic can
        forge a well-formed one), and the registry is the one record of where aliases point."""
        kind, name = event["event"], event["name"]
        if kind == "alias-set":
            self._alias_moved((name, event["alias"]))
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
            self._metrics.forget_model(name, version)
        # Any event may change what the bare name resolves to (the registry decides).
        self._alias_moved((name, DEFAULT))

    def _bump(self, key: AliasKey) -> int:
        self._alias_gen[key] = self._alias_gen.get(key, 0) + 1
        return self._alias_gen[key]

    def _drop_alias(self, key: AliasKey) -> None:
        self._bump(key)
        self.splits.set(key, ())
        if self._aliases.pop(key, None) is not None:
            self._serving.pop(key[0], None)

    def _alias_moved(self, key: AliasKey) -> None:
        """``key`` may point elsewhere now: ask the registry, and swap in the background."""
        gen = self._bump(key)
        if key not in self._aliases:
            self.splits.set(key, ())
            return  # not served here: the next request resolves afresh
        task = asyncio.get_running_loop().create_task(self._swap(key, gen))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _swap(self, key: AliasKey, gen: int) -> None:
        """Point ``key`` where the registry says, once that version is loaded. Meanwhile, and
        for good where loading it fails for a reason of its own (a corrupt artifact), requests
        keep the version that works; a failure that can pass (the registry or S3 away, a slow
        load) is tried again, with backoff, until it succeeds or a later event asks again."""
        name, alias = key
        shown = f"{name}@{alias}" if alias else name
        delay = SWAP_RETRY_FIRST_S
        while True:
            try:
                version = await self._source.resolve(name, alias)
                split = await split_of(self._source, name, alias)
                await self.model(name, str(version))
                break
            except NotFound as exc:
                log.warning("%s no longer resolves (%s); the next request resolves it", shown, exc)
                if self._alias_gen.get(key) == gen:
                    self._drop_alias(key)
                return
            except Exception as exc:
                self._metrics.swaps.labels(name, "failed").inc()
                if not is_retriable(exc):
                    log.error("not swapping %s to where the registry points it: %s", shown, exc)
                    return
                log.warning("swapping %s failed, trying again in %g s: %s", shown, delay, exc)
            await asyncio.sleep(delay)
            delay = min(2 * delay, SWAP_RETRY_MAX_S)
            if self._alias_gen.get(key) != gen:
                return  # a later event asked again: its swap goes on instead
        if self._alias_gen.get(key) != gen:
            return  # a later event asked again; its answer counts
        self.splits.set(key, split)
        self._serving.pop(name, None)
        previous = self._aliases.get(key)
        if previous != version:
            self._point(key, version)
            self._metrics.swaps.labels(name, "ok").inc()
            log.info("swapped %s: version %s -> %d", shown, previous, version)

    async def wait_background(self) -> None:
        """Let in-progress swaps finish (tests and shutdown)."""
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    async def close(self) -> None:
        self.ready = False
        for task in list(self._background):
            task.cancel()
        await self.wait_background()
