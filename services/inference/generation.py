"""Token generation with continuous batching: every active stream advances in one decode step.

``DecodeBatch`` is the plain-Python core: a model, a KV cache with ``slots`` rows, and the
requests occupying them. ``admit`` prefills a new request's prompt into a free slot and picks its
first token; ``step`` runs one batched decode over every active slot (each at its own length) and
picks one token per request. A finished or cancelled request gives its slot back at once.

``GenerationEngine`` drives a batch from one decode thread: between two steps it drops cancelled
requests and admits waiting ones, so a new request joins the running batch after at most one step
instead of waiting for the others to finish. Tokens reach asyncio callers through ``stream``.
The decode thread owns the cache; every other thread only queues requests and cancellations.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import threading
from collections import defaultdict, deque
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge

from maas.errors import InvalidArgument, Unavailable
from maas.text.gpt import GPT, KVCache
from maas.text.sampling import (
    FINISH_LENGTH,
    FINISH_STOP,
    Sampler,
    SamplingParams,
    TextStream,
    Token,
    finish_of,
    prompt_ids,
)
from services.inference.dataplane import DataPlane

log = logging.getLogger(__name__)

DEFAULT_SLOTS = 8
CANCELLED = "cancelled"
FAILED = "failed"
Emit = Callable[[Token | BaseException], None]  # called on the decode thread
Delivery = tuple["asyncio.Queue[Token | BaseException]", Token | BaseException]


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
        self.active = Gauge(
            "maas_generation_active_streams", "streams holding a decode slot", ["model"], registry=r
        )


@dataclass(eq=False)
class Request:
    """One stream's prompt, parameters and progress; ``emit`` receives each token, then stops."""

    ids: list[int]
    params: SamplingParams
    emit: Emit
    sampler: Sampler = field(init=False)
    text: TextStream = field(init=False)
    slot: int = -1
    position: int = 0  # cache positions filled
    generated: int = 0
    last: int = 0  # the token the next step feeds
    cancelled: bool = False

    def __post_init__(self) -> None:
        self.sampler = Sampler(self.params)
        self.text = TextStream(self.params.stop)


class DecodeBatch:
    """The slots of one model's KV cache and the requests in them (single-threaded)."""

    def __init__(
        self, model: GPT, slots: int, metrics: GenerationMetrics | None = None, label: str = ""
    ) -> None:
        if slots < 1:
            raise InvalidArgument(f"generation slots={slots} must be at least 1")
        self.model = model
        self.cache = KVCache(model.config, slots)
        # A heap: the lowest free slot is taken first, so busy slots stay a consecutive run and
        # the decode step reads the cache as a view instead of gathering rows.
        self.free = list(range(slots))
        self.active: dict[int, Request] = {}
        metrics = metrics or GenerationMetrics()
        self._tokens = metrics.tokens.labels(label)
        self._active = metrics.active.labels(label)
        self._ended = {
            reason: metrics.streams.labels(label, reason)
            for reason in (FINISH_STOP, FINISH_LENGTH, CANCELLED, FAILED)
        }

    @torch.inference_mode()
    def admit(self, request: Request) -> None:
        """Prefill ``request``'s prompt into a free slot and emit its first token."""
        request.slot = heapq.heappop(self.free)
        self.active[request.slot] = request
        self._active.set(len(self.active))
        ids = torch.tensor([request.ids])
        logits = self.model.step(
            ids, self.cache, torch.tensor([request.slot]), torch.zeros(1, dtype=torch.long)
        )
        request.position = len(request.ids)
        self._first(request, logits[0])

    @torch.inference_mode()
    def step(self) -> None:
        """One decode step for every active request, then one token to each."""
        requests = [self.active[slot] for slot in sorted(self.active)]
        last = torch.tensor([[r.last] for r in requests])
        slots = torch.tensor([r.slot for r in requests])
        positions = torch.tensor([r.position for r in requests])
        logits = self.model.step(last, self.cache, slots, positions)
        # Greedy rows take one argmax over the whole batch instead of one call per row.
        greedy = logits.argmax(dim=-1).tolist()
        self._tokens.inc(len(requests))
        for row, request in enumerate(requests):
            request.position += 1
            is_greedy = request.params.temperature == 0 and not request.params.logit_bias
            self._advance(request, greedy[row] if is_greedy else request.sampler.pick(logits[row]))

    def _first(self, request: Request, logits: torch.Tensor) -> None:
        self._tokens.inc()
        self._advance(request, request.sampler.pick(logits))

    def _advance(self, request: Request, token: int) -> None:
        request.generated += 1
        request.last = token
        text = request.text.feed(token)
        finish = finish_of(
            request.text,
            request.generated,
            request.position + 1,
            request.params,
            self.model.config.block_size,
        )
        if finish is None:
            request.emit(Token(token, text))
            return
        if not request.text.finished:
            text += request.text.flush()
        self.release(request, finish)
        request.emit(Token(token, text, finish))

    def release(self, request: Request, reason: str = CANCELLED) -> None:
        """Give ``request``'s slot back (idempotent)."""
        if self.active.get(request.slot) is request:
            del self.active[request.slot]
            heapq.heappush(self.free, request.slot)
            self._ended[reason].inc()
            self._active.set(len(self.active))

    def fail_all(self, error: BaseException) -> None:
        for request in list(self.active.values()):
            self.release(request, FAILED)
            request.emit(error)


class GenerationEngine:
    """One model's decode thread, fed by ``submit`` and ``cancel`` from any thread."""

    def __init__(
        self,
        model: GPT,
        *,
        slots: int = DEFAULT_SLOTS,
        name: str = "gpt",
        version: int = 0,
        metrics: GenerationMetrics | None = None,
    ) -> None:
        self.batch = DecodeBatch(model, slots, metrics, label=name)
        self.model_name, self.model_version = name, version
        self.block_size = model.config.block_size
        self._waiting: deque[Request] = deque()
        self._cancelled: list[Request] = []
        self._outbox: list[tuple[asyncio.AbstractEventLoop, Delivery]] = []  # decode thread only
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"maas-decode-{name}", daemon=True)
        self._thread.start()

    def submit(self, request: Request) -> None:
        with self._wake:
            if self._closed:
                raise Unavailable("the generation engine is closed")
            self._waiting.append(request)
            self._wake.notify()

    def cancel(self, request: Request) -> None:
        """Stop generating for ``request``; its slot is free before the next step runs."""
        with self._wake:
            request.cancelled = True
            self._cancelled.append(request)
            self._wake.notify()

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join()

    def _next_round(self) -> list[Request] | None:
        """Under the lock: apply cancellations, then take waiting requests that fit."""
        with self._wake:
            while not (self._closed or self._waiting or self._cancelled or self.batch.active):
                self._wake.wait()
            if self._closed:
                return None
            for request in self._cancelled:
                self.batch.release(request)
            self._cancelled.clear()
            admitted: list[Request] = []
            while self._waiting and len(admitted) < len(self.batch.free):
                request = self._waiting.popleft()
                if not request.cancelled:
                    admitted.append(request)
            return admitted

    def _run(self) -> None:
        while (admitted := self._next_round()) is not None:
            try:
                for request in admitted:
                    self.batch.admit(request)
                self._deliver()  # first tokens leave now, not one decode step later
                if self.batch.active:
                    self.batch.step()
            except Exception as exc:  # a failed step fails its streams, never the thread
                log.exception("decode step failed")
                self.batch.fail_all(Unavailable(f"generation failed ({type(exc).__name__})"))
            self._deliver()
        self.batch.fail_all(Unavailable("the generation engine stopped"))
        for request in self._waiting:
            request.emit(Unavailable("the generation engine stopped"))
        self._deliver()

    def _deliver(self) -> None:
        """Hand a step's tokens to their streams' loops: one wake-up per loop, not per token."""
        if not self._outbox:
            return
        by_loop: defaultdict[asyncio.AbstractEventLoop, list[Delivery]] = defaultdict(list)
        for loop, delivery in self._outbox:
            by_loop[loop].append(delivery)
        self._outbox.clear()
        for loop, deliveries in by_loop.items():
            # The caller's loop may be gone (server shut down mid-stream): nothing to tell.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_put_all, deliveries)

    async def stream(self, prompt: str, params: SamplingParams) -> AsyncGenerator[Token, None]:
        """Tokens for ``prompt`` as they are decoded; leaving early frees the slot at once."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Token | BaseException] = asyncio.Queue()

        def emit(item: Token | BaseException) -> None:
            self._outbox.append((loop, (queue, item)))

        request = Request(prompt_ids(prompt, self.block_size), params, emit)
        self.submit(request)
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finish is not None
                yield item
        finally:
            if not finished:
                self.cancel(request)


def _put_all(deliveries: list[Delivery]) -> None:
    for queue, item in deliveries:
        queue.put_nowait(item)


class Generators:
    """One engine per served GPT version, shared by every front door (OIP stream, OpenAI HTTP).

    Versions resolve through the data plane (aliases, hot swap, the LRU cache); an engine whose
    version left the cache is closed when the next engine starts.
    """

    def __init__(
        self,
        plane: DataPlane,
        *,
        slots: int = DEFAULT_SLOTS,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self._plane = plane
        self._slots = slots
        self.metrics = GenerationMetrics(registry)
        self._engines: dict[tuple[str, int], GenerationEngine] = {}

    async def engine(self, name: str, version: str = "") -> GenerationEngine:
        model = await self._plane.model(name, version)
        key = (model.name, model.version)
        engine = self._engines.get(key)
        if engine is None:
            if not isinstance(model.module, GPT):
                raise InvalidArgument(
                    f"{model.label} is not a text-generation model (arch 'gpt'); it serves "
                    "ModelInfer only"
                )
            self._close_unloaded()
            engine = GenerationEngine(
                model.module,
                slots=self._slots,
                name=model.name,
                version=model.version,
                metrics=self.metrics,
            )
            self._engines[key] = engine
        return engine

    def names(self) -> list[str]:
        """The generative models loaded now (what ``/v1/models`` lists)."""
        return sorted({m.name for m in self._plane.loaded() if isinstance(m.module, GPT)})

    def _close_unloaded(self) -> None:
        loaded = {(m.name, m.version) for m in self._plane.loaded()}
        for key in [k for k in self._engines if k not in loaded]:
            self._engines.pop(key).close()

    def close(self) -> None:
        for engine in self._engines.values():
            engine.close()
        self._engines.clear()
