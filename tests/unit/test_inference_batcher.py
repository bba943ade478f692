"""Dynamic batching: requests share forward passes, and each gets exactly its own rows back."""

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from maas import zoo
from maas.errors import Unavailable
from services.inference.batcher import (
    BatchingConfig,
    BatchReport,
    Compute,
    DirectRunner,
    DynamicBatcher,
    make_runner,
    run_batch,
)
from services.inference.served import torch_forward


class Recorder:
    def __init__(self) -> None:
        self.batches: list[BatchReport] = []
        self.depths: list[int] = []

    def queue_depth(self, rows: int) -> None:
        self.depths.append(rows)

    def batch_done(self, report: BatchReport) -> None:
        self.batches.append(report)


@pytest.fixture(scope="module")
def pool():
    with ThreadPoolExecutor(max_workers=2) as executor:
        yield executor


def pooled(forward, pool) -> Compute:
    """Every forward on the worker pool (inline execution off)."""
    return Compute(forward, pool, inline_max_ns=0)


def rowwise(x: np.ndarray) -> np.ndarray:
    # Each output row depends only on its input row, bit for bit, whatever the batch.
    return np.stack([x.sum(axis=1), x.max(axis=1)], axis=1) * np.float32(3)


def requests(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((int(rng.integers(1, 5)), 8)).astype(np.float32) for _ in range(n)]


async def submit_all(runner, inputs):
    return await asyncio.gather(*(runner.submit(x) for x in inputs))


async def test_batched_answers_are_bit_identical_to_unbatched_ones(pool):
    inputs = requests(40)
    batched = await submit_all(
        DynamicBatcher(pooled(rowwise, pool), BatchingConfig(16, 2000), Recorder()), inputs
    )
    unbatched = await submit_all(DirectRunner(pooled(rowwise, pool), Recorder()), inputs)
    for x, b, u in zip(inputs, batched, unbatched, strict=True):
        assert b.tobytes() == u.tobytes() == rowwise(x).tobytes()


async def test_concurrent_requests_share_forward_passes_up_to_max_batch_size(pool):
    recorder = Recorder()
    inputs = [np.ones((1, 8), np.float32)] * 64
    batcher = DynamicBatcher(pooled(rowwise, pool), BatchingConfig(16, 5000), recorder)
    await submit_all(batcher, inputs)
    assert sum(b.rows for b in recorder.batches) == 64
    assert max(b.rows for b in recorder.batches) == 16
    assert len(recorder.batches) < 64


async def test_a_request_larger_than_max_batch_size_runs_alone(pool):
    recorder = Recorder()
    big = np.ones((50, 8), np.float32)
    batcher = DynamicBatcher(pooled(rowwise, pool), BatchingConfig(8, 0), recorder)
    (out,) = await submit_all(batcher, [big])
    assert out.shape == (50, 2)
    assert [b.rows for b in recorder.batches] == [50]


async def test_a_full_batch_closes_without_waiting_out_the_delay(pool):
    recorder = Recorder()
    an_hour_us = 3600 * 10**6
    batcher = DynamicBatcher(pooled(rowwise, pool), BatchingConfig(4, an_hour_us), recorder)
    await asyncio.wait_for(submit_all(batcher, [np.ones((1, 8), np.float32)] * 4), timeout=60)
    assert [b.rows for b in recorder.batches] == [4]


async def test_a_partial_batch_closes_once_the_delay_has_passed(pool):
    recorder = Recorder()
    batcher = DynamicBatcher(pooled(rowwise, pool), BatchingConfig(64, 20_000), recorder)
    await asyncio.wait_for(submit_all(batcher, [np.ones((1, 8), np.float32)] * 3), timeout=60)
    assert [b.requests for b in recorder.batches] == [3]


async def test_requests_arriving_while_a_batch_runs_form_the_next_batch(pool):
    gate = threading.Event()

    def gated(x: np.ndarray) -> np.ndarray:
        gate.wait(5)
        return rowwise(x)

    recorder = Recorder()
    batcher = DynamicBatcher(pooled(gated, pool), BatchingConfig(64, 0), recorder)
    first = asyncio.ensure_future(batcher.submit(np.ones((1, 8), np.float32)))
    await asyncio.sleep(0.05)  # the first batch (one row) is now running, blocked on the gate
    rest = [asyncio.ensure_future(batcher.submit(np.ones((1, 8), np.float32))) for _ in range(10)]
    await asyncio.sleep(0.05)
    assert batcher.queued_rows == 10
    gate.set()
    await asyncio.gather(first, *rest)
    assert [b.rows for b in recorder.batches] == [1, 10]
    assert recorder.depths[-1] == 0


async def test_a_cancelled_request_is_skipped_and_the_others_answered(pool):
    gate = threading.Event()

    def gated(x: np.ndarray) -> np.ndarray:
        gate.wait(5)
        return rowwise(x)

    recorder = Recorder()
    batcher = DynamicBatcher(pooled(gated, pool), BatchingConfig(64, 0), recorder)
    first = asyncio.ensure_future(batcher.submit(np.ones((1, 8), np.float32)))
    await asyncio.sleep(0.05)
    doomed = asyncio.ensure_future(batcher.submit(np.ones((3, 8), np.float32)))
    kept = asyncio.ensure_future(batcher.submit(np.full((2, 8), 2, np.float32)))
    await asyncio.sleep(0.01)
    doomed.cancel()
    gate.set()
    await first
    np.testing.assert_array_equal(await kept, rowwise(np.full((2, 8), 2, np.float32)))
    assert [b.rows for b in recorder.batches] == [1, 2]


async def test_a_failing_forward_fails_only_its_batch(pool):
    def fragile(x: np.ndarray) -> np.ndarray:
        if (x < 0).any():
            raise ValueError("negative input")
        return rowwise(x)

    batcher = DynamicBatcher(pooled(fragile, pool), BatchingConfig(1, 0), Recorder())
    bad, good = await asyncio.gather(
        batcher.submit(-np.ones((1, 8), np.float32)),
        batcher.submit(np.ones((1, 8), np.float32)),
        return_exceptions=True,
    )
    assert isinstance(bad, ValueError)
    np.testing.assert_array_equal(good, rowwise(np.ones((1, 8), np.float32)))


async def test_a_request_the_model_cannot_compute_fails_alone_and_its_batch_mates_are_answered(
    pool,
):
    passes: list[int] = []

    def fragile(x: np.ndarray) -> np.ndarray:
        passes.append(len(x))
        if (x < 0).any():
            raise ValueError("negative input")
        return rowwise(x)

    batcher = DynamicBatcher(pooled(fragile, pool), BatchingConfig(8, 0), Recorder())
    good = [np.full((1, 8), v, np.float32) for v in (1, 2)]
    answers = await asyncio.gather(
        batcher.submit(good[0]),
        batcher.submit(-np.ones((1, 8), np.float32)),
        batcher.submit(good[1]),
        return_exceptions=True,
    )
    assert passes == [3, 1, 1, 1]  # the shared pass failed; then each request on its own
    assert isinstance(answers[1], ValueError)
    np.testing.assert_array_equal(answers[0], rowwise(good[0]))
    np.testing.assert_array_equal(answers[2], rowwise(good[1]))


async def test_stopping_the_batching_task_fails_every_waiting_request(pool):
    gate = threading.Event()

    def gated(x: np.ndarray) -> np.ndarray:
        gate.wait(5)
        return rowwise(x)

    batcher = DynamicBatcher(pooled(gated, pool), BatchingConfig(64, 0), Recorder())
    waiting = [asyncio.ensure_future(batcher.submit(np.ones((1, 8), np.float32))) for _ in range(3)]
    await asyncio.sleep(0.05)
    batcher._task.cancel()
    results = await asyncio.gather(*waiting, return_exceptions=True)
    gate.set()
    assert all(isinstance(r, Unavailable) for r in results)
    assert batcher.queued_rows == 0


async def test_the_batcher_idles_without_a_task_and_restarts_on_demand(pool):
    batcher = DynamicBatcher(pooled(rowwise, pool), BatchingConfig(8, 0), Recorder())
    await batcher.submit(np.ones((1, 8), np.float32))
    await asyncio.sleep(0)
    assert batcher._task is None
    np.testing.assert_array_equal(
        await batcher.submit(np.zeros((1, 8), np.float32)), rowwise(np.zeros((1, 8), np.float32))
    )


async def test_cheap_forwards_run_inline_once_their_cost_is_known(pool):
    threads = []

    def where(x: np.ndarray) -> np.ndarray:
        threads.append(threading.current_thread())
        return rowwise(x)

    compute = Compute(where, pool, inline_max_ns=10**9)
    for _ in range(3):
        await compute.run([np.ones((1, 8), np.float32)])
    assert threads[0] is not threading.current_thread()  # cost unknown: the pool measures it
    assert threads[1:] == [threading.current_thread()] * 2


async def test_a_request_predicted_to_be_slow_goes_to_the_pool(pool):
    threads = []

    def where(x: np.ndarray) -> np.ndarray:
        threads.append(threading.current_thread())
        return rowwise(x)

    compute = Compute(where, pool, inline_max_ns=10**7)
    await compute.run([np.ones((1, 8), np.float32)])
    await compute.run([np.ones((10**6, 8), np.float32)])  # a million rows: far over the budget
    assert threading.current_thread() not in threads


async def test_a_size_not_seen_yet_is_predicted_from_smaller_ones_then_learned(pool):
    compute = Compute(rowwise, pool, inline_max_ns=10**9)
    await compute.run([np.ones((1, 8), np.float32)])
    one = compute.predicted_ns(1)
    assert compute.predicted_ns(16) == 16 * one  # linear: an over-estimate
    await compute.run([np.ones((16, 8), np.float32)])
    assert compute.predicted_ns(16) != 16 * one  # measured now
    assert compute.predicted_ns(9) == compute.predicted_ns(16)  # same size class


async def test_an_idle_batcher_runs_a_cheap_request_at_once_on_the_loop(pool):
    threads = []

    def where(x: np.ndarray) -> np.ndarray:
        threads.append(threading.current_thread())
        return rowwise(x)

    recorder = Recorder()
    batcher = DynamicBatcher(
        Compute(where, pool, inline_max_ns=10**9), BatchingConfig(8, 0), recorder
    )
    await batcher.submit(np.ones((1, 8), np.float32))  # cost unknown: queued, run on the pool
    out = await batcher.submit(np.full((1, 8), 2, np.float32))
    np.testing.assert_array_equal(out, rowwise(np.full((1, 8), 2, np.float32)))
    assert threads[-1] is threading.current_thread()
    assert [b.requests for b in recorder.batches] == [1, 1]


async def test_requests_queued_in_one_loop_turn_share_one_forward_on_the_loop(pool):
    threads = []

    def where(x: np.ndarray) -> np.ndarray:
        threads.append(threading.current_thread())
        return rowwise(x)

    compute = Compute(where, pool, inline_max_ns=10**9)
    await compute.run([np.ones((1, 8), np.float32)])  # the cost is known now: cheap
    recorder = Recorder()
    batcher = DynamicBatcher(compute, BatchingConfig(64, 0), recorder)
    inputs = [np.full((1, 8), i, np.float32) for i in range(5)]
    outputs = await submit_all(batcher, inputs)
    assert [b.requests for b in recorder.batches] == [5]
    assert threads[-1] is threading.current_thread()
    for x, out in zip(inputs, outputs, strict=True):
        np.testing.assert_array_equal(out, rowwise(x))


async def _cheap_batcher(pool, recorder: Recorder) -> DynamicBatcher:
    compute = Compute(rowwise, pool, inline_max_ns=10**9)
    await compute.run([np.ones((1, 8), np.float32)])  # the cost is known now: cheap
    return DynamicBatcher(compute, BatchingConfig(64, 0), recorder)


async def test_an_idle_batcher_answers_a_cheap_request_after_one_loop_turn_not_two(pool):
    batcher = await _cheap_batcher(pool, Recorder())
    answer = asyncio.ensure_future(batcher.submit(np.ones((1, 8), np.float32)))
    turns = 0
    while not answer.done():
        await asyncio.sleep(0)
        turns += 1
    assert turns == 2  # the request's own first step, then the turn it waited for company


async def test_a_request_cancelled_while_it_waits_for_company_leaves_the_others_answered(pool):
    recorder = Recorder()
    batcher = await _cheap_batcher(pool, recorder)
    leader = asyncio.ensure_future(batcher.submit(np.ones((1, 8), np.float32)))
    await asyncio.sleep(0)  # the leader now waits one turn for company
    follower = asyncio.ensure_future(batcher.submit(np.full((2, 8), 2, np.float32)))
    leader.cancel()
    out = await asyncio.wait_for(follower, 5)
    np.testing.assert_array_equal(out, rowwise(np.full((2, 8), 2, np.float32)))
    later = await asyncio.wait_for(batcher.submit(np.full((1, 8), 3, np.float32)), 5)
    np.testing.assert_array_equal(later, rowwise(np.full((1, 8), 3, np.float32)))
    assert leader.cancelled()


async def test_inline_and_pooled_forwards_give_identical_answers(pool):
    x = requests(1)[0]
    inline = Compute(rowwise, pool, inline_max_ns=10**9)
    first, _ = await inline.run([x])
    second, _ = await inline.run([x])
    assert first[0].tobytes() == second[0].tobytes() == rowwise(x).tobytes()


def test_batch_size_one_means_no_batching(pool):
    assert isinstance(make_runner(rowwise, pool, BatchingConfig(1, 100), Recorder()), DirectRunner)
    assert isinstance(make_runner(rowwise, pool, BatchingConfig(2, 0), Recorder()), DynamicBatcher)


def test_run_batch_splits_outputs_back_in_request_order():
    inputs = [np.full((n, 8), n, np.float32) for n in (3, 1, 2)]
    outputs = run_batch(rowwise, inputs)
    assert [o.shape[0] for o in outputs] == [3, 1, 2]
    for x, out in zip(inputs, outputs, strict=True):
        np.testing.assert_array_equal(out, rowwise(x))


def test_a_model_that_drops_rows_is_an_error():
    with pytest.raises(RuntimeError, match="returned 1 rows for a batch of 3"):
        run_batch(lambda x: x[:1], [np.ones((3, 8), np.float32)])


async def test_a_real_mlp_batched_matches_unbatched_to_float_rounding(pool):
    # BLAS picks kernels by batch size, so a row's last bits may differ between a batch of one
    # and a batch of many; the values agree to float32 rounding and the predictions exactly.
    model = zoo.build("mlp", {}).eval()
    forward = torch_forward(model)
    inputs = requests(32, seed=1)
    inputs = [
        np.random.default_rng(i).standard_normal((len(x), 64)).astype(np.float32)
        for i, x in enumerate(inputs)
    ]
    batcher = DynamicBatcher(pooled(forward, pool), BatchingConfig(64, 2000), Recorder())
    batched = await submit_all(batcher, inputs)
    for x, b in zip(inputs, batched, strict=True):
        with torch.inference_mode():
            alone = model(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(b, alone, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(b.argmax(axis=1), alone.argmax(axis=1))
