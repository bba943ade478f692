"""Run a model's forward pass for many requests: dynamically batched, or one request at a time.

``DynamicBatcher`` queues requests per model and runs them as one forward pass over their rows
concatenated along the batch dimension, then hands each request its own rows back. A batch
closes when it holds ``max_batch_size`` rows or when its oldest request has waited
``max_queue_delay_us``; while a batch is running, new requests keep queueing, so under load the
next batch fills up without any added delay (a delay of 0 batches only that backlog, which costs
nothing at concurrency 1). ``DirectRunner`` is the unbatched baseline: every request is its own
forward pass, run concurrently on the worker pool.

Forward passes run on a fixed-size thread pool (``Compute``), except those predicted to be
cheaper than running there: the hand-off to a worker costs two thread wake-ups and a loop turn
(100-400 us of CPU on a busy 2-core machine), and a small model's forward mostly holds the GIL
anyway. Those run on the event loop. The prediction uses the model's measured cost per row, so
a large request never runs there.

A request never starts its own forward pass at once: it queues, and the queue is served by a
callback scheduled for the end of the current loop turn, so every request that arrived in the
same turn joins one batch. When that batch is cheap it runs right there in the callback (no
task, no thread); otherwise a draining task takes it to the pool and keeps serving the queue
until it is empty.

Whatever happens to the batching task, no caller is left waiting: a batch that fails runs
again request by request, so a request whose input the model cannot compute fails alone, and a
cancelled task fails everything still queued.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from maas.errors import Unavailable
from maas.waiting import set_within

Forward = Callable[[np.ndarray], np.ndarray]  # rows in, rows out


@dataclass(frozen=True)
class BatchingConfig:
    max_batch_size: int = 64  # rows per forward pass; 1 (or less) turns batching off
    max_queue_delay_us: int = 0

    @property
    def enabled(self) -> bool:
        return self.max_batch_size > 1


@dataclass(frozen=True)
class BatchReport:
    requests: int
    rows: int
    queue_ns: int  # summed over the batch's requests: time from submit to the forward pass
    compute_ns: int


class RunObserver(Protocol):
    def queue_depth(self, rows: int) -> None: ...

    def batch_done(self, report: BatchReport) -> None: ...


def run_batch(forward: Forward, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """One forward pass over the inputs' rows, split back per input (views, no copies)."""
    # concatenate always copies, which also gives torch a writable buffer for read-only views.
    batch = np.concatenate(inputs, axis=0)
    output = forward(batch)
    if output.shape[0] != batch.shape[0]:
        raise RuntimeError(
            f"the model returned {output.shape[0]} rows for a batch of {batch.shape[0]}"
        )
    if len(inputs) == 1:
        return [output]
    bounds = np.cumsum([len(x) for x in inputs])[:-1]
    return np.split(output, bounds, axis=0)


def _timed_run_batch(
    forward: Forward, inputs: Sequence[np.ndarray]
) -> tuple[list[np.ndarray], int, int]:
    """Outputs, wall ns (what statistics report) and this thread's CPU ns (what the inline
    decision uses: unlike wall time it does not swell when other processes load the cores).
    Timed where it runs, so a worker's time excludes the hand-off to and from it."""
    started, cpu_started = time.perf_counter_ns(), time.thread_time_ns()
    outputs = run_batch(forward, inputs)
    return outputs, time.perf_counter_ns() - started, time.thread_time_ns() - cpu_started


class Compute:
    """Where one model's forward passes run: the worker pool, or inline when predicted cheap.

    The prediction is the measured CPU time of a pass of about that many rows (sizes rounded up to
    a power of two); a size not seen yet is extrapolated linearly from the largest smaller size
    seen, which over-estimates (a pass costs less than proportionally more for more rows), so an
    unknown size goes to the pool once and is then known.
    """

    # Weight of the newest measurement in each size's cost estimate.
    _SMOOTHING = 0.2

    def __init__(self, forward: Forward, executor: Executor, inline_max_ns: int) -> None:
        self._forward = forward
        self._executor = executor
        self._inline_max_ns = inline_max_ns
        self._ns_by_size: dict[int, float] = {}  # rows rounded up to a power of two -> ns

    def predicted_ns(self, rows: int) -> float | None:
        size = _size_class(rows)
        known = self._ns_by_size.get(size)
        if known is not None:
            return known
        smaller = [s for s in self._ns_by_size if s < size]
        if not smaller:
            return None
        nearest = max(smaller)
        return self._ns_by_size[nearest] * size / nearest

    def predicted_cheap(self, rows: int) -> bool:
        predicted = self.predicted_ns(rows)
        return predicted is not None and predicted <= self._inline_max_ns

    def run_here(self, inputs: Sequence[np.ndarray], rows: int) -> tuple[list[np.ndarray], int]:
        """On the calling thread (the event loop, for a batch predicted cheap)."""
        outputs, compute_ns, cpu_ns = _timed_run_batch(self._forward, inputs)
        self._learn(rows, cpu_ns)
        return outputs, compute_ns

    async def run(self, inputs: Sequence[np.ndarray]) -> tuple[list[np.ndarray], int]:
        """Outputs per input and the compute time in ns: inline if cheap, else on the pool."""
        rows = sum(len(x) for x in inputs)
        if self.predicted_cheap(rows):
            return self.run_here(inputs, rows)
        loop = asyncio.get_running_loop()
        outputs, compute_ns, cpu_ns = await loop.run_in_executor(
            self._executor, _timed_run_batch, self._forward, inputs
        )
        self._learn(rows, cpu_ns)
        return outputs, compute_ns

    def _learn(self, rows: int, cpu_ns: int) -> None:
        size = _size_class(rows)
        known = self._ns_by_size.get(size)
        self._ns_by_size[size] = (
            cpu_ns if known is None else self._SMOOTHING * cpu_ns + (1 - self._SMOOTHING) * known
        )


def _size_class(rows: int) -> int:
    return 1 << max(rows - 1, 0).bit_length()


class DirectRunner:
    """No batching: each request is its own forward pass, concurrently on the worker pool."""

    def __init__(self, compute: Compute, observer: RunObserver) -> None:
        self._compute = compute
        self._observer = observer

    async def submit(self, x: np.ndarray) -> np.ndarray:
        (output,), compute_ns = await self._compute.run([x])
        self._observer.batch_done(BatchReport(1, len(x), 0, compute_ns))
        return output


@dataclass
class _Pending:
    rows: np.ndarray
    future: asyncio.Future[np.ndarray]
    enqueued_ns: int = field(default_factory=time.perf_counter_ns)


class DynamicBatcher:
    """Per-model request queue whose batches run one at a time, inline or on the worker pool."""

    def __init__(self, compute: Compute, config: BatchingConfig, observer: RunObserver) -> None:
        self._compute = compute
        self._max_rows = max(1, config.max_batch_size)
        self._max_delay_ns = config.max_queue_delay_us * 1000
        self._observer = observer
        self._pending: deque[_Pending] = deque()
        self._queued_rows = 0
        self._full = asyncio.Event()
        self._kick_scheduled = False
        self._task: asyncio.Task[None] | None = None

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    async def submit(self, x: np.ndarray) -> np.ndarray:
        loop = asyncio.get_running_loop()
        item = _Pending(x, loop.create_future())
        self._pending.append(item)
        self._set_queued(self._queued_rows + len(x))
        if self._task is not None:
            if self._queued_rows >= self._max_rows:
                self._full.set()
        elif not self._kick_scheduled:
            await self._lead_the_turn()
        return await item.future  # answered already when the turn's batch ran inline

    async def _lead_the_turn(self) -> None:
        """Wait one loop turn, so every request arriving with this one queues too, then batch
        them here. Running the batch on the first request's own task answers it without a
        further wake-up: one loop turn less at concurrency 1, where the batch is this request."""
        self._kick_scheduled = True
        try:
            await asyncio.sleep(0)
        except asyncio.CancelledError:
            asyncio.get_running_loop().call_soon(self._kick)  # the others still need their batch
            raise
        self._kick()

    def _kick(self) -> None:
        self._kick_scheduled = False
        if self._task is not None or not self._pending:
            return
        if self._max_delay_ns <= 0:
            while batch := self._take_batch():
                rows = sum(len(item.rows) for item in batch)
                if not self._compute.predicted_cheap(rows):
                    self._start_drain(batch)
                    return
                self._run_here(batch, rows)
        if self._pending:
            self._start_drain([])

    def _start_drain(self, first: list[_Pending]) -> None:
        # The draining task lives only while there is work, so an idle or evicted model
        # holds no task and needs no shutdown.
        self._task = asyncio.get_running_loop().create_task(self._drain(first))

    def _set_queued(self, rows: int) -> None:
        self._queued_rows = rows
        self._observer.queue_depth(rows)

    async def _drain(self, first: list[_Pending]) -> None:
        batch = first
        try:
            while batch or self._pending:
                if batch:
                    await self._run(batch)
                if self._pending:
                    await self._wait_for_batch()
                batch = self._take_batch()
        except BaseException:
            _fail(batch, _stopped())
            self._fail_pending()
            raise
        finally:
            self._task = None

    async def _wait_for_batch(self) -> None:
        if self._max_delay_ns <= 0 or self._queued_rows >= self._max_rows:
            return
        waited_ns = time.perf_counter_ns() - self._pending[0].enqueued_ns
        remaining_s = (self._max_delay_ns - waited_ns) / 1e9
        if remaining_s <= 0:
            return
        self._full.clear()
        await set_within(self._full, remaining_s)

    def _take_batch(self) -> list[_Pending]:
        batch: list[_Pending] = []
        rows = 0
        while self._pending:
            item = self._pending[0]
            if item.future.done():  # the caller gave up (cancelled or deadline): skip it
                self._pending.popleft()
                self._set_queued(self._queued_rows - len(item.rows))
                continue
            if batch and rows + len(item.rows) > self._max_rows:
                break
            self._pending.popleft()
            self._set_queued(self._queued_rows - len(item.rows))
            batch.append(item)
            rows += len(item.rows)
        return batch

    def _run_here(self, batch: list[_Pending], rows: int) -> None:
        started = time.perf_counter_ns()
        try:
            outputs, compute_ns = self._compute.run_here([item.rows for item in batch], rows)
        except Exception as exc:
            if len(batch) == 1:
                _fail(batch, exc)
                return
            for item in batch:  # one request's input may be what failed: the others go on
                self._run_here([item], len(item.rows))
            return
        self._answer(batch, outputs, started, compute_ns)

    async def _run(self, batch: list[_Pending]) -> None:
        started = time.perf_counter_ns()
        try:
            outputs, compute_ns = await self._compute.run([item.rows for item in batch])
        except asyncio.CancelledError:
            _fail(batch, _stopped())
            raise
        except Exception as exc:
            if len(batch) == 1:
                _fail(batch, exc)
                return
            for item in batch:  # one request's input may be what failed: the others go on
                await self._run([item])
            return
        self._answer(batch, outputs, started, compute_ns)

    def _answer(
        self, batch: list[_Pending], outputs: list[np.ndarray], started: int, compute_ns: int
    ) -> None:
        for item, output in zip(batch, outputs, strict=True):
            if not item.future.done():
                item.future.set_result(output)
        self._observer.batch_done(
            BatchReport(
                requests=len(batch),
                rows=sum(len(item.rows) for item in batch),
                queue_ns=sum(started - item.enqueued_ns for item in batch),
                compute_ns=compute_ns,
            )
        )

    def _fail_pending(self) -> None:
        _fail(self._pending, _stopped())
        self._pending.clear()
        self._set_queued(0)


def _stopped() -> Unavailable:
    return Unavailable("the server stopped this model's batching task; retry the request")


def _fail(items: Iterable[_Pending], exc: BaseException) -> None:
    for item in items:
        if not item.future.done():
            item.future.set_exception(exc)


Runner = DirectRunner | DynamicBatcher


def make_runner(
    forward: Forward,
    executor: Executor,
    config: BatchingConfig,
    observer: RunObserver,
    *,
    inline_max_us: int = 0,
) -> Runner:
    compute = Compute(forward, executor, inline_max_us * 1000)
    if config.enabled:
        return DynamicBatcher(compute, config, observer)
    return DirectRunner(compute, observer)
