"""Token generation as a service: each generative model version's decode loop, as async streams.

``decoding.DecodeBatch`` is the core (continuous batching over one KV cache); ``decode_worker``
runs it in a child process per model version, behind two pipes, so the server's event loop and
the decode step never wait on each other's interpreter lock. ``GenerationEngine`` is the
server's side of those pipes: it submits requests while slots are free, hands each token to its
stream, and turns a cancelled or departed stream into a cancel the loop applies before its next
step. ``Generators`` keeps one engine per served version for every front door.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
from collections import deque
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge
from torch import nn

from maas.errors import FailedPrecondition, InvalidArgument, Unavailable
from maas.text.gpt import GPT
from maas.text.gpt_config import kv_cache_bytes
from maas.text.sampling import FINISH_LENGTH, FINISH_STOP, SamplingParams, Token, prompt_ids
from services.inference import decode_worker
from services.inference.admission import MiB
from services.inference.dataplane import DataPlane
from services.inference.served import ServedModel

log = logging.getLogger(__name__)

DEFAULT_SLOTS = 8
# Streams that may wait for a slot, per slot; more are refused UNAVAILABLE (retriable) rather
# than queued: one client that sent 3 000 requests made another's 8-token completion wait 43 s.
WAITING_PER_SLOT = 32
CANCELLED = "cancelled"
FAILED = "failed"
# An unloaded version's decode loop runs on this long at most for the streams it has (a whole
# block of tokens takes about a second here); then they fail, as at a crash.
UNLOAD_DRAIN_S = 30.0
DRAIN_POLL_S = 0.05


class GenerationMetrics:
    """Prometheus series of generation, on the server's registry beside its other metrics."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry or CollectorRegistry()
        self.tokens = Counter("maas_generation_tokens", "generated tokens", ["model"], registry=r)
        self.streams = Counter(
            "maas_generation_streams",
            "ended streams by reason (stop, length, cancelled, failed)",
            ["model", "reason"],
            registry=r,
        )
        # By version: two versions stream at once during a canary, each on its own slots.
        self.active = Gauge(
            "maas_generation_active_streams",
            "streams holding a decode slot",
            ["model", "version"],
            registry=r,
        )


@dataclass(eq=False)
class _Stream:
    id: int
    ids: list[int]
    params: SamplingParams
    tokens: asyncio.Queue[Token | BaseException] = field(default_factory=asyncio.Queue)


class GenerationEngine:
    """One model version's decode loop (``decode_worker``), read as async token streams.

    ``start`` launches the loop and binds its pipes to the running event loop, which then owns
    the engine. Streams beyond the slots wait here in arrival order and are submitted as slots
    free, so the decode loop never holds more requests than it has slots.
    """

    def __init__(
        self,
        worker: decode_worker.Worker,
        *,
        slots: int,
        name: str,
        version: int,
        block_size: int,
        metrics: GenerationMetrics,
    ) -> None:
        self.model_name, self.model_version = name, version
        self.block_size, self.slots = block_size, slots
        self.closed = False
        self.draining = False  # unloaded: takes no new streams, finishes those it has
        self.pid = worker.pid  # the decode process; None when it is a thread of this one
        self._worker = worker
        self._ids = itertools.count()
        self._waiting: deque[_Stream] = deque()
        self._running: dict[int, _Stream] = {}
        self._commands: asyncio.WriteTransport | None = None
        self._events: asyncio.ReadTransport | None = None
        self._tokens = metrics.tokens.labels(name)
        self._active = metrics.active.labels(name, str(version))
        self._ended = {
            reason: metrics.streams.labels(name, reason)
            for reason in (FINISH_STOP, FINISH_LENGTH, CANCELLED, FAILED)
        }

    @classmethod
    async def start(
        cls,
        model: GPT,
        *,
        slots: int = DEFAULT_SLOTS,
        name: str = "gpt",
        version: int = 0,
        metrics: GenerationMetrics | None = None,
        isolated: bool = True,
        cpus: frozenset[int] = frozenset(),
    ) -> GenerationEngine:
        """Decode ``model`` in a child process (``isolated``; on ``cpus`` only, if any are
        named) or a thread of this one."""
        if slots < 1:
            raise InvalidArgument(f"generation slots={slots} must be at least 1")
        if isolated:
            worker = await asyncio.to_thread(decode_worker.start_process, model, slots, name, cpus)
        else:
            worker = await asyncio.to_thread(decode_worker.start_thread, model, slots, name)
        engine = cls(
            worker,
            slots=slots,
            name=name,
            version=version,
            block_size=model.config.block_size,
            metrics=metrics or GenerationMetrics(),
        )
        loop = asyncio.get_running_loop()
        engine._commands, _ = await loop.connect_write_pipe(
            lambda: _Gone(engine), os.fdopen(worker.commands, "wb", buffering=0)
        )
        engine._events, _ = await loop.connect_read_pipe(
            lambda: _Events(engine), os.fdopen(worker.events, "rb", buffering=0)
        )
        return engine

    async def stream(self, prompt: str, params: SamplingParams) -> AsyncGenerator[Token, None]:
        """Tokens for ``prompt`` as they are decoded; leaving early frees the slot at once."""
        if self.closed:
            raise Unavailable("the generation engine is closed")
        if self.draining:
            raise Unavailable(
                f"version {self.model_version} of {self.model_name!r} is being unloaded; retry: "
                "the next request loads the model again"
            )
        if len(self._waiting) >= WAITING_PER_SLOT * self.slots:
            raise Unavailable(
                f"{len(self._waiting)} requests are waiting for one of the {self.slots} "
                f"generation slots of {self.model_name!r} version {self.model_version}, the "
                "most that may wait; retry shortly"
            )
        stream = _Stream(next(self._ids), prompt_ids(prompt, self.block_size), params)
        self._waiting.append(stream)
        self._admit()
        finished = False
        try:
            while not finished:
                item = await stream.tokens.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finish is not None
                yield item
        finally:
            if not finished:
                self._cancel(stream)

    def drain(self, within_s: float) -> asyncio.Future[None]:
        """Take no new streams from now on, let the running and waiting ones finish (for at
        most ``within_s``), then close; the future is done once closed. Unloading a version this
        way ends no stream it started: streams cut mid-answer got no end and no error (Triton
        lets in-flight requests finish, too)."""
        self.draining = True
        return asyncio.ensure_future(self._close_when_idle(within_s))

    async def _close_when_idle(self, within_s: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_s
        while (self._running or self._waiting) and not self.closed and loop.time() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
        await self.close()

    async def close(self) -> None:
        """End the decode loop and fail the streams still open."""
        if self._commands is not None and not self.closed:
            self.closed = True
            self._commands.close()  # the loop sees end-of-file and returns
            await asyncio.to_thread(self._worker.join, 5.0)
        self._stopped("the generation engine stopped")

    def _admit(self) -> None:
        while self._waiting and len(self._running) < self.slots and self._commands is not None:
            stream = self._waiting.popleft()
            self._running[stream.id] = stream
            self._commands.write(decode_worker.submit(stream.id, stream.ids, stream.params))
        self._active.set(len(self._running))

    def _cancel(self, stream: _Stream) -> None:
        if self._running.pop(stream.id, None) is None:
            with contextlib.suppress(ValueError):
                self._waiting.remove(stream)
            return
        self._ended[CANCELLED].inc()
        if not self.closed and self._commands is not None:
            self._commands.write(decode_worker.cancel(stream.id))
            self._admit()

    def _on_events(self, events: list[decode_worker.Event]) -> None:
        for event in events:
            stream = self._running.get(event[0])
            if stream is None:  # cancelled while this step ran
                continue
            item = decode_worker.token_of(event)
            if isinstance(item, Token):
                self._tokens.inc()
                if item.finish is not None:
                    self._end(stream, item.finish)
            else:
                self._end(stream, FAILED)
            stream.tokens.put_nowait(item)
        self._admit()

    def _end(self, stream: _Stream, reason: str) -> None:
        del self._running[stream.id]
        self._ended[reason].inc()

    def _lost(self) -> None:
        """A pipe closed: after ``close``, as asked; before it, the decode loop died."""
        if self.closed:
            self._stopped("the generation engine stopped")
        else:
            self._stopped("its decode loop ended (a crash, or the process was killed)")

    def _stopped(self, why: str) -> None:
        """The decode loop is gone: every open stream fails and the engine takes no more."""
        if not self.closed:
            log.error("%s v%s: %s", self.model_name, self.model_version, why)
        self.closed = True
        for stream in list(self._running.values()):
            self._end(stream, FAILED)
            stream.tokens.put_nowait(Unavailable(why))
        for stream in self._waiting:
            stream.tokens.put_nowait(Unavailable(why))
        self._waiting.clear()
        self._active.set(0)
        for transport in (self._commands, self._events):
            if transport is not None:
                transport.close()


class _Events(asyncio.Protocol):
    """The decode loop's events pipe: whole frames go to the engine; its end, the loop's."""

    def __init__(self, engine: GenerationEngine) -> None:
        self._engine = engine
        self._frames = decode_worker.Frames()

    def data_received(self, data: bytes) -> None:
        for events in self._frames.feed(data):
            self._engine._on_events(events)  # type: ignore[arg-type]

    def connection_lost(self, exc: Exception | None) -> None:
        self._engine._lost()


class _Gone(asyncio.BaseProtocol):
    """The command pipe: the reader's end closing means the decode loop is gone."""

    def __init__(self, engine: GenerationEngine) -> None:
        self._engine = engine

    def connection_lost(self, exc: Exception | None) -> None:
        self._engine._lost()


class Generators:
    """One engine per served GPT version, shared by every front door (OIP stream, OpenAI HTTP).

    Versions resolve through the data plane (aliases, hot swap, the LRU cache). A GPT version's
    engine starts as soon as the plane loads it and closes as soon as the version leaves it
    (evicted or unloaded); one whose decode loop died is replaced by the next request for its
    version.
    """

    def __init__(
        self,
        plane: DataPlane,
        *,
        slots: int = DEFAULT_SLOTS,
        registry: CollectorRegistry | None = None,
        isolated: bool = True,
        cpus: frozenset[int] = frozenset(),
    ) -> None:
        self._plane = plane
        self._slots = slots
        self._isolated = isolated
        self._cpus = cpus
        self.metrics = GenerationMetrics(registry)
        self._engines: dict[tuple[str, int], GenerationEngine] = {}
        self._starting: dict[tuple[str, int], asyncio.Future[GenerationEngine]] = {}
        self._closing: set[asyncio.Future[None]] = set()
        self._draining: set[GenerationEngine] = set()  # unloaded, finishing their streams
        self._closed = False
        plane.on_loaded.append(self._loaded)
        plane.on_unloaded.append(self._unloaded)
        plane.held_beside_weights.append(self._decode_cache_bytes)

    def _decode_cache_bytes(self, name: str, version: int, module: nn.Module) -> int:
        """A GPT version's key/value cache for this server's slots, counted as the cache's; one
        that could not fit it even alone is refused before a decode process allocates it."""
        if not isinstance(module, GPT):
            return 0
        needed = kv_cache_bytes(module.config, self._slots)
        capacity = self._plane.cache_capacity_bytes
        if needed > capacity:
            raise FailedPrecondition(
                f"model {name!r} version {version} needs {needed / MiB:.0f} MiB of key/value "
                f"cache to decode {self._slots} streams (n_layer x block_size x n_embd), over "
                f"MAAS_INFERENCE_CACHE_BYTES={capacity / MiB:.0f} MiB; register a smaller "
                "block_size or n_layer, or an operator raises the cache or lowers "
                "MAAS_INFERENCE_GENERATION_SLOTS"
            )
        return needed

    async def engine(self, name: str, version: str = "", routing_key: str = "") -> GenerationEngine:
        """The decode engine of ``name``'s version ``version`` (a number, an alias, or "": the
        default; a split alias draws one, sticky by ``routing_key``), started if need be."""
        model = await self._plane.model(name, version, routing_key)
        if self._closed:  # a process started now would outlive the server
            raise Unavailable("the server is stopping; it starts no more generation engines")
        key = (model.name, model.version)
        engine = self._engines.get(key)
        if engine is not None and not engine.closed:
            return engine
        if not isinstance(model.module, GPT):
            raise InvalidArgument(
                f"{model.label} is not a text-generation model (arch 'gpt'); it serves "
                "ModelInfer only"
            )
        return await asyncio.shield(self._starting_for(key, model.module))

    def _loaded(self, model: ServedModel) -> None:
        """A version just loaded: a GPT's decode loop starts now, so that its first stream (or
        the first after an alias moved to it) does not wait for a process to start."""
        engine = self._engines.get((model.name, model.version))
        if isinstance(model.module, GPT) and not self._closed and (engine is None or engine.closed):
            self._starting_for((model.name, model.version), model.module)

    def _unloaded(self, model: ServedModel) -> None:
        """A version left the plane (evicted, or unloaded by request): its decode loop ends
        once the streams it has finished."""
        engine = self._engines.pop((model.name, model.version), None)
        if engine is not None:
            self._draining.add(engine)
            closing = engine.drain(UNLOAD_DRAIN_S)
            closing.add_done_callback(lambda _: self._draining.discard(engine))
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)

    def _starting_for(self, key: tuple[str, int], model: GPT) -> asyncio.Future[GenerationEngine]:
        """The start of ``key``'s engine: the one under way, or a new one."""
        starting = self._starting.get(key)
        if starting is None:
            starting = asyncio.ensure_future(self._start(key, model))
            self._starting[key] = starting
            starting.add_done_callback(lambda done: self._started(key, done))
        return starting

    def _started(self, key: tuple[str, int], done: asyncio.Future[GenerationEngine]) -> None:
        self._starting.pop(key, None)
        if not done.cancelled() and done.exception() is not None:  # retrieved: maybe no waiter
            log.error("%s v%s: its decode loop did not start", *key, exc_info=done.exception())

    async def _start(self, key: tuple[str, int], model: GPT) -> GenerationEngine:
        await self._close_unloaded()
        engine = await GenerationEngine.start(
            model,
            slots=self._slots,
            name=key[0],
            version=key[1],
            metrics=self.metrics,
            isolated=self._isolated,
            cpus=self._cpus,
        )
        self._engines[key] = engine
        return engine

    def names(self) -> list[str]:
        """The generative models loaded now (what ``/v1/models`` lists)."""
        return sorted({m.name for m in self._plane.loaded() if isinstance(m.module, GPT)})

    async def _close_unloaded(self) -> None:
        # An engine whose version was unloaded while it was starting.
        loaded = {(m.name, m.version) for m in self._plane.loaded()}
        for key in [k for k in self._engines if k not in loaded]:
            await self._engines.pop(key).close()

    async def close(self) -> None:
        """Close every engine, those still starting included: their processes end with us."""
        self._closed = True
        for engine in list(self._draining):  # the server is stopping: no more waiting
            await engine.close()
        await asyncio.gather(*self._starting.values(), *self._closing, return_exceptions=True)
        engines, self._engines = list(self._engines.values()), {}
        for engine in engines:
            await engine.close()
