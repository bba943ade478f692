"""The continuous-batching decode engine: batched equals alone, slots come back at once, and a
decode process that dies fails its streams, not the server."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch
from prometheus_client import CollectorRegistry

from maas.compression import quant
from maas.errors import FailedPrecondition, Unavailable
from maas.text.gpt import GPT
from maas.text.gpt_config import GPTConfig, kv_cache_bytes
from maas.text.sampling import FINISH_LENGTH, SamplingParams, Token, generate
from services.inference.batcher import BatchingConfig
from services.inference.dataplane import DataPlane
from services.inference.decoding import DecodeBatch, Request
from services.inference.generation import (
    WAITING_PER_SLOT,
    GenerationEngine,
    GenerationMetrics,
    Generators,
)
from services.inference.sources import MemorySource

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIG = GPTConfig(block_size=48, n_layer=2, n_head=2, n_embd=32)
GREEDY = SamplingParams(max_tokens=12, temperature=0)
PROMPTS = ("def main():", "x", "import os\nimport sys\n", "class Foo(Bar):\n    ")


@pytest.fixture(scope="module")
def model() -> GPT:
    import torch

    torch.manual_seed(5)
    return GPT(CONFIG).eval()


@pytest.fixture
async def engine(model: GPT) -> AsyncIterator[GenerationEngine]:
    """The server's kind: decoding in a child process of its own."""
    running = await GenerationEngine.start(model, slots=2)
    yield running
    await running.close()


def _solo(model: GPT, prompt: str, params: SamplingParams) -> list[Token]:
    return list(generate(model, prompt, params))


def _request(model: GPT, prompt: str, params: SamplingParams, out: list[Token]) -> Request:
    from maas.text.sampling import prompt_ids

    def emit(item: Token | BaseException) -> None:
        assert isinstance(item, Token)
        out.append(item)

    return Request(prompt_ids(prompt, model.config.block_size), params, emit)


def _drain(batch: DecodeBatch) -> None:
    while batch.active:
        batch.step()


def test_batched_greedy_equals_each_sequence_alone(model: GPT) -> None:
    batch = DecodeBatch(model, slots=4)
    outputs: list[list[Token]] = [[] for _ in PROMPTS]
    for prompt, out in zip(PROMPTS, outputs, strict=True):
        batch.admit(_request(model, prompt, GREEDY, out))
    _drain(batch)
    for prompt, out in zip(PROMPTS, outputs, strict=True):
        assert out == _solo(model, prompt, GREEDY)


def test_requests_joining_between_steps_decode_as_if_alone(model: GPT) -> None:
    batch = DecodeBatch(model, slots=3)
    sampled = SamplingParams(max_tokens=10, temperature=0.8, top_k=40, seed=3)
    first: list[Token] = []
    late: list[Token] = []
    batch.admit(_request(model, PROMPTS[0], sampled, first))
    batch.step()
    batch.step()
    batch.admit(_request(model, PROMPTS[2], GREEDY, late))
    _drain(batch)
    assert first == _solo(model, PROMPTS[0], sampled)
    assert late == _solo(model, PROMPTS[2], GREEDY)


def test_a_biased_greedy_row_decodes_as_if_alone(model: GPT) -> None:
    batch = DecodeBatch(model, slots=2)
    first = _solo(model, PROMPTS[0], GREEDY)[0].id
    biased = SamplingParams(max_tokens=8, temperature=0, logit_bias=((first, -100.0),))
    plain: list[Token] = []
    banned: list[Token] = []
    batch.admit(_request(model, PROMPTS[0], GREEDY, plain))
    batch.admit(_request(model, PROMPTS[0], biased, banned))
    _drain(batch)
    assert plain == _solo(model, PROMPTS[0], GREEDY)
    assert banned == _solo(model, PROMPTS[0], biased)
    assert all(t.id != first for t in banned)


def test_a_warmed_batch_decodes_as_a_fresh_one(model: GPT) -> None:
    batch = DecodeBatch(model, slots=2)
    batch.warm()
    assert sorted(batch.free) == [0, 1] and not batch.active
    out: list[Token] = []
    batch.admit(_request(model, "x", GREEDY, out))  # into slot 0, the one warmed
    _drain(batch)
    assert out == _solo(model, "x", GREEDY)


def test_a_finished_request_gives_its_slot_back(model: GPT) -> None:
    batch = DecodeBatch(model, slots=2)
    out: list[Token] = []
    batch.admit(_request(model, "a", SamplingParams(max_tokens=3, temperature=0), out))
    assert len(batch.free) == 1
    _drain(batch)
    assert len(out) == 3 and out[-1].finish == FINISH_LENGTH
    assert sorted(batch.free) == [0, 1]


def test_a_draw_that_fails_ends_its_own_stream_and_the_others_decode_on(model: GPT) -> None:
    batch = DecodeBatch(model, slots=2)
    out: list[Token] = []
    batch.admit(_request(model, "x", GREEDY, out))
    errors: list[Token | BaseException] = []
    failing = Request([1, 2, 3], SamplingParams(max_tokens=20, seed=1), errors.append)
    batch.admit(failing)

    def fail(logits: object) -> int:
        raise RuntimeError("probability tensor contains either inf, nan or element < 0")

    failing.sampler.pick = fail  # type: ignore[method-assign]
    _drain(batch)
    assert [type(e) for e in errors] == [Token, RuntimeError]  # its first token, then the end
    assert out == _solo(model, "x", GREEDY)
    assert sorted(batch.free) == [0, 1]


def test_the_lowest_free_slot_is_taken_so_busy_slots_stay_consecutive(model: GPT) -> None:
    batch = DecodeBatch(model, slots=4)
    params = SamplingParams(max_tokens=20, temperature=0)
    requests = [_request(model, p, params, []) for p in PROMPTS[:3]]
    for request in requests:
        batch.admit(request)
    batch.release(requests[1])
    late = _request(model, PROMPTS[3], params, [])
    batch.admit(late)
    assert [r.slot for r in requests] == [0, 1, 2] and late.slot == 1


async def _collect(engine: GenerationEngine, prompt: str, params: SamplingParams) -> list[Token]:
    return [token async for token in engine.stream(prompt, params)]


async def test_concurrent_streams_each_get_their_own_tokens(
    model: GPT, engine: GenerationEngine
) -> None:
    results = await asyncio.wait_for(
        asyncio.gather(*(_collect(engine, p, GREEDY) for p in PROMPTS)), timeout=60
    )
    assert results == [_solo(model, p, GREEDY) for p in PROMPTS]


async def test_every_sampling_setting_reaches_the_decode_process(
    model: GPT, engine: GenerationEngine
) -> None:
    params = SamplingParams(
        max_tokens=20,
        temperature=0.9,
        top_p=0.9,
        top_k=50,
        seed=2**63,
        stop=("e",),
        logit_bias=((256, -100.0), (101, 5.0)),
    )
    tokens = await asyncio.wait_for(_collect(engine, "def main():", params), timeout=30)
    assert tokens == _solo(model, "def main():", params)


async def test_a_cancelled_stream_frees_its_slot_at_once(engine: GenerationEngine) -> None:
    endless = SamplingParams(max_tokens=10_000, temperature=1.0, seed=1)
    streams = [engine.stream("a", endless), engine.stream("b", endless)]
    for stream in streams:  # both slots busy, each for far longer than this test waits
        await asyncio.wait_for(anext(stream), timeout=30)
    await streams[0].aclose()
    tokens = await asyncio.wait_for(_collect(engine, "c", GREEDY), timeout=30)
    assert tokens[-1].finish is not None
    await streams[1].aclose()


async def test_each_version_counts_its_own_streams_holding_a_slot(model: GPT) -> None:
    registry = CollectorRegistry()
    metrics = GenerationMetrics(registry)
    engines = [
        await GenerationEngine.start(
            model, slots=2, name="gpt", version=v, metrics=metrics, isolated=False
        )
        for v in (1, 2)
    ]
    endless = SamplingParams(max_tokens=10_000, temperature=1.0, seed=1)
    streams = [engine.stream("a", endless) for engine in engines for _ in range(2)][:3]
    for stream in streams:  # two slots of version 1 busy, one of version 2
        await asyncio.wait_for(anext(stream), timeout=30)

    def active(version: int) -> float | None:
        labels = {"model": "gpt", "version": str(version)}
        return registry.get_sample_value("maas_generation_active_streams", labels)

    assert (active(1), active(2)) == (2, 1)
    for stream in streams:
        await stream.aclose()
    for engine in engines:
        await engine.close()


async def test_a_failing_prefill_fails_its_own_stream_only(model: GPT) -> None:
    failing = _Failing(model, (1, len("poison")))  # patched here: a decode thread
    engine = await GenerationEngine.start(failing, slots=2, isolated=False)  # type: ignore[arg-type]
    try:
        running = engine.stream("a", SamplingParams(max_tokens=40, temperature=0))
        await asyncio.wait_for(anext(running), timeout=30)
        with pytest.raises(Unavailable, match="generation failed"):
            await asyncio.wait_for(_collect(engine, "poison", GREEDY), timeout=30)
        rest = await asyncio.wait_for(_collect_rest(running), timeout=30)
        assert rest[-1].finish == FINISH_LENGTH
    finally:
        await engine.close()


async def test_a_failing_decode_step_fails_its_streams_not_the_engine(model: GPT) -> None:
    # The first step decoding both rows fails. Both prompts are submitted at once, but on a
    # loaded machine the decode thread could finish the first stream alone before the second
    # one's submit arrived (then no step ever held both rows): a lone stream's steps are slowed.
    failing = _Failing(model, (2, 1), lone_step_s=0.05)
    engine = await GenerationEngine.start(failing, slots=2, isolated=False)  # type: ignore[arg-type]
    try:
        results = await asyncio.gather(
            *(_collect(engine, p, GREEDY) for p in PROMPTS[:2]), return_exceptions=True
        )
        assert all(isinstance(r, Unavailable) for r in results)
        tokens = await asyncio.wait_for(_collect(engine, "a", GREEDY), timeout=30)
        assert tokens == _solo(model, "a", GREEDY)
    finally:
        await engine.close()


async def test_a_killed_decode_process_fails_its_streams_and_closes_the_engine(
    engine: GenerationEngine,
) -> None:
    endless = SamplingParams(max_tokens=10_000, temperature=1.0, seed=1)
    stream = engine.stream("a", endless)
    await asyncio.wait_for(anext(stream), timeout=30)
    assert engine.pid is not None
    os.kill(engine.pid, signal.SIGKILL)
    with pytest.raises(Unavailable, match="decode loop ended"):
        await asyncio.wait_for(_collect_rest(stream), timeout=30)
    assert engine.closed
    with pytest.raises(Unavailable, match="closed"):
        await anext(engine.stream("b", GREEDY))


async def test_an_int8_gpt_decodes_in_its_own_process_as_in_this_one(model: GPT) -> None:
    stored = quant.prepare(model, "int8")
    weights = {k: v for k, v in stored.items() if isinstance(v, quant.Int8Weight)}
    int8 = quant.convert(copy.deepcopy(model), weights)
    engine = await GenerationEngine.start(int8, slots=1)
    try:
        tokens = await asyncio.wait_for(_collect(engine, "def main():", GREEDY), timeout=60)
    finally:
        await engine.close()
    assert tokens == _solo(int8, "def main():", GREEDY)


async def test_a_closed_engine_refuses_new_streams(model: GPT) -> None:
    engine = await GenerationEngine.start(model, slots=1)
    await engine.close()
    with pytest.raises(Unavailable, match="closed"):
        async with contextlib.aclosing(engine.stream("a", GREEDY)) as stream:
            await anext(stream)


async def test_streams_past_those_that_may_wait_for_a_slot_are_refused_retriable(
    model: GPT,
) -> None:
    gate = threading.Event()
    held = _GatedDecode(model, gate)  # the one slot stays taken while the gate is shut
    engine = await GenerationEngine.start(held, slots=1, isolated=False)  # type: ignore[arg-type]
    running = engine.stream("def main():", GREEDY)  # a one-byte prompt's prefill is gated too
    waiting = [engine.stream("b", GREEDY) for _ in range(WAITING_PER_SLOT)]
    queued: list[asyncio.Task[Token]] = []
    try:
        await asyncio.wait_for(anext(running), timeout=30)
        queued += [asyncio.create_task(anext(stream)) for stream in waiting]
        await asyncio.sleep(0.1)  # each waiting stream appended itself to the queue
        with pytest.raises(Unavailable, match=r"32 requests are waiting for one of the 1 gen"):
            await anext(engine.stream("c", GREEDY))
        assert not any(task.done() for task in queued)
    finally:
        for task in queued:
            task.cancel()
        await asyncio.gather(*queued, return_exceptions=True)
        gate.set()
        for stream in [running, *waiting]:
            await stream.aclose()
        await engine.close()


async def test_streams_beyond_the_slots_wait_and_then_decode_as_if_alone(model: GPT) -> None:
    engine = await GenerationEngine.start(model, slots=1)
    try:
        results = await asyncio.wait_for(
            asyncio.gather(*(_collect(engine, p, GREEDY) for p in PROMPTS)), timeout=60
        )
    finally:
        await engine.close()
    assert results == [_solo(model, p, GREEDY) for p in PROMPTS]


async def test_a_new_stream_gets_its_first_token_before_the_next_decode_step(model: GPT) -> None:
    gate = threading.Event()
    held = _GatedDecode(model, gate)  # patched in this process: a decode thread, not a process
    engine = await GenerationEngine.start(held, slots=1, isolated=False)  # type: ignore[arg-type]
    stream = engine.stream("def main():", GREEDY)
    try:
        first = await asyncio.wait_for(anext(stream), timeout=30)  # the step after it is held
        assert first == _solo(model, "def main():", GREEDY)[0]
    finally:
        gate.set()
        await stream.aclose()
        await engine.close()


async def _collect_rest(stream: AsyncIterator[Token]) -> list[Token]:
    return [token async for token in stream]


class _GatedDecode:
    """The model, with every one-token decode step held until ``gate`` opens (prefills pass)."""

    def __init__(self, model: GPT, gate: threading.Event) -> None:
        self.config, self._model, self._gate = model.config, model, gate

    def step(self, idx: torch.Tensor, *args: Any) -> torch.Tensor:
        if idx.shape[1] == 1:
            self._gate.wait(30)
        return self._model.step(idx, *args)


class _Failing:
    """The model, whose first step over ids of ``shape`` (rows, new tokens) raises; a one-row,
    one-token step takes at least ``lone_step_s`` (time for a second stream to join)."""

    def __init__(self, model: GPT, shape: tuple[int, int], lone_step_s: float = 0.0) -> None:
        self.config, self._model, self._shape, self._failed = model.config, model, shape, False
        self._lone_step_s = lone_step_s

    def step(self, idx: torch.Tensor, *args: Any) -> torch.Tensor:
        if tuple(idx.shape) == self._shape and not self._failed:
            self._failed = True
            raise RuntimeError("boom")
        if tuple(idx.shape) == (1, 1):
            time.sleep(self._lone_step_s)  # the decode thread's own time, off the event loop
        return self._model.step(idx, *args)


@pytest.fixture
async def plane(model: GPT) -> AsyncIterator[DataPlane]:
    """A data plane serving ``model`` as "gpt"."""
    source = MemorySource()
    source.add("gpt", model, "gpt", dataclasses.asdict(CONFIG), aliases=["production"])
    with ThreadPoolExecutor(1) as pool:
        serving = DataPlane(source, pool, batching=BatchingConfig(), cache_bytes=1 << 30)
        yield serving
        await serving.close()


@pytest.fixture
async def generators(plane: DataPlane) -> AsyncIterator[Generators]:
    """The server's engines over ``plane``."""
    engines = Generators(plane, slots=1)
    yield engines
    await engines.close()


async def test_the_next_request_after_a_decode_process_died_gets_a_new_one(
    model: GPT, generators: Generators
) -> None:
    dead = await generators.engine("gpt")
    assert dead.pid is not None
    os.kill(dead.pid, signal.SIGKILL)
    await asyncio.wait_for(_until(lambda: dead.closed), timeout=30)
    engine = await generators.engine("gpt")
    tokens = await asyncio.wait_for(_collect(engine, "a", GREEDY), timeout=30)
    assert engine is not dead and engine.pid != dead.pid
    assert tokens == _solo(model, "a", GREEDY)


async def _until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.01)


async def test_closing_while_an_engine_starts_leaves_no_decode_process(
    generators: Generators,
) -> None:
    starting = asyncio.create_task(generators.engine("gpt"))
    await asyncio.wait_for(_until(lambda: bool(generators._starting)), timeout=30)
    await generators.close()
    engine = await starting
    with pytest.raises(Unavailable, match="stopping"):
        await generators.engine("gpt")
    assert engine.closed
    assert not _decode_processes()


def _decode_processes() -> list[multiprocessing.process.BaseProcess]:
    return [p for p in multiprocessing.active_children() if p.name.startswith("maas-decode")]


async def test_a_gpt_version_counts_its_decode_cache_beside_its_weights(model: GPT) -> None:
    source = MemorySource()
    source.add("gpt", model, "gpt", dataclasses.asdict(CONFIG), aliases=["production"])
    with ThreadPoolExecutor(1) as pool:
        plane = DataPlane(source, pool, batching=BatchingConfig(), cache_bytes=1 << 30)
        generators = Generators(plane, slots=3, isolated=False)
        served = await plane.model("gpt")
        await generators.close()
        await plane.close()
    weights = sum(t.numel() * 4 for t in model.state_dict().values())
    assert served.nbytes == weights + kv_cache_bytes(CONFIG, 3)


async def test_a_gpt_whose_decode_cache_could_never_fit_is_refused_naming_the_settings(
    model: GPT,
) -> None:
    source = MemorySource()
    source.add("gpt", model, "gpt", dataclasses.asdict(CONFIG), aliases=["production"])
    budget = kv_cache_bytes(CONFIG, 8) - 1
    with ThreadPoolExecutor(1) as pool:
        plane = DataPlane(source, pool, batching=BatchingConfig(), cache_bytes=budget)
        generators = Generators(plane, slots=8, isolated=False)
        with pytest.raises(FailedPrecondition, match="MAAS_INFERENCE_GENERATION_SLOTS"):
            await generators.engine("gpt")
        assert not plane.loaded()
        await generators.close()
        await plane.close()


async def test_a_gpt_versions_decode_process_starts_when_the_version_loads(
    plane: DataPlane, generators: Generators
) -> None:
    await plane.model("gpt")  # loaded as any request would load it, no stream yet
    await asyncio.wait_for(_until(lambda: bool(_decode_processes())), timeout=30)
    (started,) = _decode_processes()
    engine = await generators.engine("gpt")
    assert engine.pid == started.pid


async def test_unloading_a_gpt_version_ends_its_decode_process(
    plane: DataPlane, generators: Generators
) -> None:
    engine = await generators.engine("gpt")
    assert _decode_processes()
    plane.unload("gpt")
    await asyncio.wait_for(_until(lambda: not _decode_processes()), timeout=30)
    assert engine.closed


async def test_unloading_a_version_mid_stream_lets_its_streams_finish_and_takes_no_new_ones(
    model: GPT, plane: DataPlane, generators: Generators
) -> None:
    engine = await generators.engine("gpt")  # one slot: the second stream waits for it
    running, waiting = engine.stream("a", GREEDY), engine.stream("b", GREEDY)
    first = await asyncio.wait_for(anext(running), timeout=30)
    queued = asyncio.ensure_future(_collect_rest(waiting))
    await asyncio.sleep(0)  # the waiting stream has asked for its slot
    plane.unload("gpt")
    with pytest.raises(Unavailable, match="being unloaded; retry"):
        await anext(engine.stream("c", GREEDY))
    rest = await asyncio.wait_for(_collect_rest(running), timeout=30)
    assert [first, *rest] == _solo(model, "a", GREEDY)
    assert await asyncio.wait_for(queued, timeout=30) == _solo(model, "b", GREEDY)
    await asyncio.wait_for(_until(lambda: engine.closed and not _decode_processes()), timeout=30)
