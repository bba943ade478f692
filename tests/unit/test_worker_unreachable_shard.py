"""A shard that says ``up`` but that its job's workers cannot reach (a ghost member, a wrong
address): each worker's link reports it once it has lasted a heartbeat timeout, and again every
timeout (time passed in); the worker puts it in the job's status, which the coordinator's pool
scheduler reads to move the partition once every rank reported it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
from pool_kit import SentEvents, link_to, ticking_clock

from maas import events
from maas.config import Settings
from maas.errors import MaasError
from maas.training.broadcast import params_pieces
from maas.training.pool import SHARD, WORKER, Assignment, Want
from services.aggregator.scheduler import PoolScheduler
from services.gradient_worker import link as link_module
from services.gradient_worker.link import ShardLink
from services.gradient_worker.service import Running, WorkerService

TIMEOUT_MS = 10_000
TICK_MS = 4_000  # how far the fake clock moves each time it is read
NOBODY = "127.0.0.1:1"  # nothing listens there: every dial is refused


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> None:
    ticking_clock(monkeypatch, TICK_MS)
    monkeypatch.setattr(link_module, "RETRY_S", 0.001)
    monkeypatch.setattr(link_module, "MAX_RETRY_S", 0.001)


async def test_a_link_reports_a_shard_it_never_reached_once_per_timeout(clock: None) -> None:
    reports: list[tuple[int, str, str]] = []
    link: ShardLink

    async def unreachable(partition: int, address: str, what: str) -> None:
        reports.append((partition, address, what))
        link.over = len(reports) == 2  # enough seen: stop dialling

    link = link_to(NOBODY, Settings(worker_heartbeat_timeout_ms=TIMEOUT_MS), unreachable)
    await link.run()
    (p1, a1, first), (p2, a2, second) = reports
    assert (p1, a1, p2, a2) == (0, NOBODY, 0, NOBODY)
    # The first dial is at 4 s and each refusal 4 s after the one before: the first refused a
    # timeout or more after that dial (at 16 s) is reported, then the first a timeout later.
    assert first.startswith("nothing from it for 12000 ms; last: UNAVAILABLE")
    assert second.startswith("nothing from it for 24000 ms")  # one timeout later, not sooner


async def test_every_ranks_report_in_the_status_moves_the_partition() -> None:
    assignment = Assignment("j", 3, {0: "w-0", 1: "w-1"}, {0: "ghost"}, {0: NOBODY})
    statuses = SentEvents()
    for rank in (0, 1):
        worker = WorkerService(Settings(member_id=f"w-{rank}"))
        worker._pool.producer = statuses  # type: ignore[assignment]
        worker.jobs["j"] = SimpleNamespace(rank=rank, assignment=assignment)  # type: ignore[assignment]
        await worker._unreachable_reporter("j", rank)(0, NOBODY, "nothing from it for 10000 ms")
    for status in statuses.sent:
        events.validate(status, events.JOB_STATUS)
    reason = statuses.sent[1]["reason"]
    assert reason.startswith("gradient worker w-1 (rank 1) cannot reach the shard of partition 0")
    assert f"(ghost) at {NOBODY}: nothing from it for 10000 ms" in reason

    settings = Settings(worker_heartbeat_timeout_ms=TIMEOUT_MS)
    scheduler = PoolScheduler(settings, statuses, None, print, print)  # type: ignore[arg-type]
    pool = scheduler.pool
    for member, kind, address in [
        ("w-0", WORKER, ""),
        ("w-1", WORKER, ""),
        ("ghost", SHARD, NOBODY),
        ("s-1", SHARD, "10.0.0.1:7070"),
    ]:
        pool.heard(member, kind, address, events.now_ms())
    pool.resume(assignment, Want("j", workers=2, shards=1, min_workers=2))
    for status in statuses.sent:
        scheduler.worker_report(status)
    (change,) = pool.schedule()
    assert change.assignment is not None and change.assignment.shards == {0: "s-1"}


async def test_a_shard_that_takes_the_stream_but_never_answers_is_reported() -> None:
    async def silent(requests: AsyncIterator[bytes], context: object) -> AsyncIterator[bytes]:
        async for _ in requests:
            pass  # a hung shard: it reads the join and never answers it
        if False:
            yield b""

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "maas.training.v1.TrainingDataPlane",
                {"Exchange": grpc.stream_stream_rpc_method_handler(silent)},
            ),
        )
    )
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    reports: list[str] = []
    link: ShardLink

    async def unreachable(partition: int, at: str, what: str) -> None:
        reports.append(what)
        link.over = True

    link = link_to(address, Settings(auth=False, worker_heartbeat_timeout_ms=300), unreachable)
    try:
        await asyncio.wait_for(link.run(), 30)
    finally:
        await server.stop(grace=None)
    (what,) = reports
    assert "last: the shard accepted the stream but sent nothing in 300 ms" in what


def _serve(handler) -> tuple[grpc.aio.Server, str]:  # type: ignore[no-untyped-def]
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "maas.training.v1.TrainingDataPlane",
                {"Exchange": grpc.stream_stream_rpc_method_handler(handler)},
            ),
        )
    )
    return server, f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"


async def test_a_partition_that_moves_ends_the_stream_to_its_old_shard_at_once() -> None:
    # A shard frozen mid-job (SIGSTOP, a paused VM) keeps its connection open and silent: the
    # coordinator moved its partition after ~10 s, but the workers read the old stream until
    # the process woke, and the job stood still all that time.
    piece = params_pieces(
        np.zeros(4, np.float32),
        version=0,
        final=False,
        durable_version=0,
        dtype="float32",
        chunk_bytes=1 << 20,
    )

    async def answers_once_then_hangs(requests, context):  # type: ignore[no-untyped-def]
        await requests.__anext__()  # the join
        for frame in piece:
            yield frame
        await asyncio.Event().wait()

    joined = asyncio.Event()

    async def new_owner(requests, context):  # type: ignore[no-untyped-def]
        await requests.__anext__()
        joined.set()
        await asyncio.Event().wait()
        yield b""

    old, old_address = _serve(answers_once_then_hangs)
    new, new_address = _serve(new_owner)
    await old.start()
    await new.start()
    address = [old_address]
    received = asyncio.Event()
    link = link_to(
        lambda partition: address[0],
        Settings(auth=False),
        on_params=lambda shard, params: received.set(),
    )
    running = asyncio.create_task(link.run())
    try:
        await asyncio.wait_for(received.wait(), 30)
        address[0] = new_address  # the job's newest assignment names another shard
        link.follow()
        await asyncio.wait_for(joined.wait(), 30)
    finally:
        link.over = True
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await old.stop(grace=None)
        await new.stop(grace=None)


async def test_a_push_made_after_its_job_was_left_is_dropped() -> None:
    # A cancel lands while a step computes: the job is left (its links cleared), then the
    # step's pushes arrive on the loop. They raised IndexError in an asyncio callback.
    worker = WorkerService(Settings(member_id="w-0"))
    running = SimpleNamespace(links=[])

    class Job:
        steps = 0

        def take(self) -> None:
            return None

        def compute(self, view: None, emit) -> None:  # type: ignore[no-untyped-def]
            emit(0, SimpleNamespace(frame=b"x", version=0))

    running.job = Job()
    loop = asyncio.get_running_loop()
    errors: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _, context: errors.append(context))
    await worker._step(loop, "j", running)  # type: ignore[arg-type]
    await asyncio.sleep(0)  # the push's callback runs
    assert errors == []


class Dials:
    """A link whose every dial runs ``step(link, n)`` (n counts from 1) instead of a stream."""

    def __init__(
        self, monkeypatch: pytest.MonkeyPatch, step: Callable[[ShardLink, int], Awaitable[str]]
    ) -> None:
        self.count = 0
        self.link = link_to(NOBODY, Settings(worker_heartbeat_timeout_ms=TIMEOUT_MS))

        async def exchange() -> str:
            self.count += 1
            return await step(self.link, self.count)

        monkeypatch.setattr(self.link, "_exchange", exchange)


@pytest.mark.parametrize(
    "failure",
    [asyncio.CancelledError(), RuntimeError("a fault nobody foresaw")],
    ids=["grpc-cancelled-the-call", "unexpected-error"],
)
async def test_a_stream_that_fails_oddly_is_dialled_again_not_the_link_ended(
    clock: None, monkeypatch: pytest.MonkeyPatch, failure: BaseException
) -> None:
    # grpc.aio raises CancelledError from a call it cancelled itself; that, or any error nobody
    # foresaw, would end the link's task without a word, its job waiting for the rank for good.
    async def step(link: ShardLink, dial: int) -> str:
        if dial == 1:
            raise failure
        link.over = True  # the second dial got through: enough
        return ""

    dials = Dials(monkeypatch, step)
    await dials.link.run()
    assert dials.count == 2


async def test_a_link_cancelled_by_its_worker_ends(clock: None) -> None:
    link = link_to(NOBODY, Settings(worker_heartbeat_timeout_ms=TIMEOUT_MS))
    task = asyncio.create_task(link.run())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_link_task_that_died_is_started_again_while_its_job_goes_on(clock: None) -> None:
    link = link_to(NOBODY, Settings(worker_heartbeat_timeout_ms=TIMEOUT_MS))
    runs = 0

    async def run() -> None:
        nonlocal runs
        runs += 1
        if runs == 1:
            raise RuntimeError("a bug in the link")
        await asyncio.sleep(3600)

    link.run = run  # type: ignore[method-assign]
    assignment = Assignment("j", 1, {0: "w-0"}, {0: "s-0"}, {0: NOBODY})
    running = Running(None, assignment, [link])  # type: ignore[arg-type]
    running.tasks = [asyncio.create_task(link.run())]
    await asyncio.sleep(0)
    running.restart_dead_links()
    await asyncio.sleep(0)
    assert runs == 2 and not running.tasks[0].done()
    running.tasks[0].cancel()


async def test_a_link_whose_cancellation_was_lost_inside_a_stream_still_ends(
    clock: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Python 3.11's wait_for loses a cancellation that meets the call's own end: the stream's
    # error came out instead, and the link dialled again for a job its worker had left.
    async def step(link: ShardLink, dial: int) -> str:
        link.over = dial == 3  # without the fix: bounded, and the task is not cancelled
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(0)  # the cancellation is delivered here and lost
        raise MaasError("the stream ended")

    dials = Dials(monkeypatch, step)
    task = asyncio.create_task(dials.link.run())
    await asyncio.wait({task})
    assert task.cancelled() and dials.count == 1


async def test_a_closed_link_dials_no_more(clock: None, monkeypatch: pytest.MonkeyPatch) -> None:
    async def step(link: ShardLink, dial: int) -> str:
        link.close()  # the worker leaves the job while this stream is open
        return ""

    dials = Dials(monkeypatch, step)
    await dials.link.run()
    assert dials.count == 1
