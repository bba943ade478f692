"""A gradient worker whose token the shards refuse fails the job it was given and then leaves
the training pool for a while, its health saying why, instead of failing every job the
coordinator would give it next; it offers itself again afterwards."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from pool_kit import SentEvents

from maas.config import Settings
from maas.errors import InvalidArgument
from maas.training.control import Heartbeat, Identity
from maas.training.pool import Assignment
from services.gradient_worker import service as worker_service
from services.gradient_worker.service import Running, WorkerService

REFUSED = "the shard of partition 0 at 127.0.0.1:9 refused this gradient worker's token"


def states(producer: SentEvents) -> list[str]:
    return [event["state"] for event in producer.sent]


async def test_a_withdrawn_member_says_down_and_then_nothing_until_it_rejoins() -> None:
    producer = SentEvents()
    heartbeat = Heartbeat(producer, Settings(member_heartbeat_ms=10), Identity("w-1", "worker"))  # type: ignore[arg-type]
    beating = asyncio.create_task(heartbeat.run())
    await asyncio.sleep(0.03)
    await heartbeat.withdraw()
    said_before = len(producer.sent)
    await asyncio.sleep(0.05)
    assert states(producer)[said_before - 1 :] == ["down"]
    await heartbeat.rejoin()
    await asyncio.sleep(0.03)
    beating.cancel()
    assert states(producer)[said_before] == "up" and len(producer.sent) > said_before + 1


def refused_worker(rejoin_after_ms: int) -> WorkerService:
    service = WorkerService(Settings(worker_rejoin_after_ms=rejoin_after_ms))
    service._pool.heartbeat._producer = SentEvents()  # type: ignore[assignment]
    return service


@pytest.fixture
def worker() -> WorkerService:
    return refused_worker(50)


def sent(worker: WorkerService) -> SentEvents:
    return worker._pool.heartbeat._producer  # type: ignore[return-value]


async def test_a_refused_worker_is_out_of_the_pool_and_unhealthy_saying_why(
    worker: WorkerService,
) -> None:
    worker._withdraw(REFUSED)
    await asyncio.sleep(0.01)
    assert states(sent(worker)) == ["down"]
    assert worker.liveness.reason is not None and REFUSED in worker.liveness.reason
    assert "out of the training pool for 0 s" in worker.liveness.reason


async def test_a_refused_worker_offers_itself_again_after_the_wait(worker: WorkerService) -> None:
    worker._withdraw(REFUSED)
    await asyncio.sleep(0.1)
    assert states(sent(worker)) == ["down", "up"]
    assert worker.liveness.healthy


async def test_each_refusal_in_a_row_doubles_the_time_out_of_the_pool(
    worker: WorkerService,
) -> None:
    waits = []
    for _ in range(3):
        worker._withdraw(REFUSED)
        assert worker._out_of_pool is not None
        started = asyncio.get_running_loop().time()
        await worker._out_of_pool
        waits.append(asyncio.get_running_loop().time() - started)
    assert waits[1] >= 2 * 0.05 and waits[2] >= 4 * 0.05


async def test_a_second_refusal_while_out_of_the_pool_changes_nothing(
    worker: WorkerService,
) -> None:
    worker._withdraw(REFUSED)
    first = worker._out_of_pool
    worker._withdraw("another job's refusal")
    assert worker._out_of_pool is first and worker._refusals == 1
    await asyncio.sleep(0.01)
    assert states(sent(worker)) == ["down"]
    await worker.stop()


async def test_a_rank_given_while_out_of_the_pool_is_not_taken(worker: WorkerService) -> None:
    worker._withdraw(REFUSED)
    given = Assignment("j", 1, {0: worker.member_id}, {0: "s-1"}, {0: "127.0.0.1:1"})
    await worker._assigned(given)  # no plan is read: S3 is not even there
    assert worker.jobs == {} and worker.out_of_pool
    await worker.stop()


async def test_a_job_refused_while_out_of_the_pool_is_left_without_saying_up() -> None:
    worker = refused_worker(30_000)
    worker._withdraw(REFUSED)
    refused = SimpleNamespace(
        refused=REFUSED, refused_at="127.0.0.1:9", over=False, shard=0, shard_version=-1
    )
    job = SimpleNamespace(finished=False, steps=0, has=lambda shard: True)
    worker.jobs["j"] = Running(job, SimpleNamespace(), [refused])  # type: ignore[arg-type,list-item]
    training = asyncio.create_task(worker._train())
    worker._wake.set()
    await asyncio.sleep(0.05)
    training.cancel()
    assert worker.jobs == {}
    assert states(sent(worker)) == ["down"]  # a failure report would have said `up`
    await worker.stop()


async def test_it_stays_out_while_the_shard_that_refused_it_still_refuses_its_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    worker = refused_worker(500)  # asked at 0.5 s, 1.5 s and 3.5 s: room between questions
    answers = [False, False, True]  # what the shard says each time it is asked
    asked: list[str] = []

    async def token_accepted(address: str, settings: Settings) -> bool | None:
        asked.append(address)
        return answers[len(asked) - 1]

    monkeypatch.setattr(worker_service, "token_accepted", token_accepted)
    worker._withdraw(REFUSED, "127.0.0.1:9")
    for _ in range(250):  # the first wait, then the first question
        if asked:
            break
        await asyncio.sleep(0.02)
    assert asked == ["127.0.0.1:9"] and states(sent(worker)) == ["down"]  # refused again
    assert worker.liveness.reason is not None and "still refuses" in worker.liveness.reason
    assert worker._out_of_pool is not None
    await worker._out_of_pool  # 1 s more, then 2 s: taken at the third question
    assert len(asked) == 3 and states(sent(worker)) == ["down", "up"]
    assert worker.liveness.healthy and worker._refusals == 3


@pytest.mark.parametrize("milliseconds", [0, -1])
def test_a_wait_of_no_time_is_refused_at_start_naming_the_setting(milliseconds: int) -> None:
    with pytest.raises(InvalidArgument, match="MAAS_WORKER_REJOIN_AFTER_MS"):
        WorkerService(Settings(worker_rejoin_after_ms=milliseconds))


async def test_a_fault_in_asking_the_shard_does_not_keep_it_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def token_accepted(address: str, settings: Settings) -> bool | None:
        raise RuntimeError("no route to the shard's host")

    monkeypatch.setattr(worker_service, "token_accepted", token_accepted)
    worker = refused_worker(50)
    worker._withdraw(REFUSED, "127.0.0.1:9")
    assert worker._out_of_pool is not None
    await asyncio.wait_for(worker._out_of_pool, 10)
    assert states(sent(worker)) == ["down", "up"] and worker.liveness.healthy
