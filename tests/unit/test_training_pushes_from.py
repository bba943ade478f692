"""A shard that resumed from a checkpoint older than what a worker can push again (the worker
took its rank over after it, or its other partitions are past the shard): the worker says from
which version it can push (``PushesFrom``), and neither waits for the other until then."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest
from pool_kit import SentEvents

from maas.config import Settings
from maas.errors import InvalidArgument
from maas.training import checkpoint as ck
from maas.training.aggregate import Contribution, ShardCore, Verdict
from maas.training.broadcast import ShardParams, read_shard_message
from maas.training.codecs import DenseGradient
from maas.training.pool import Assignment
from maas.training.prepare import Limits, PreparedJob, prepare_job
from maas.training.protocol import GradientAssembler
from maas.training.v1 import training_pb2 as pb
from maas.training.worker import WorkerJob, first_pushable
from services.aggregator.shard import ShardService
from services.aggregator.shard_job import CheckpointWriter, Peer, ShardJob, StatusReporter
from services.gradient_worker.link import ShardLink
from services.gradient_worker.service import Running
from tests.unit.test_training_aggregate import _core, _grad


def test_a_worker_that_kept_everything_since_the_shards_version_pushes_all_of_it() -> None:
    assert first_pushable(shard_version=40, kept=range(40, 47), next_version=47) is None


def test_a_push_still_on_its_way_counts_as_kept() -> None:
    assert first_pushable(shard_version=46, kept={46}, next_version=47) is None


def test_a_process_that_took_the_rank_after_the_checkpoint_pushes_from_its_first_kept() -> None:
    assert first_pushable(shard_version=40, kept=range(43, 47), next_version=47) == 43


def test_a_fresh_process_pushes_from_the_newest_version_it_was_sent() -> None:
    assert first_pushable(shard_version=40, kept=(), next_version=47) == 47


def test_a_worker_whose_kept_pushes_end_early_pushes_from_the_newest_version() -> None:
    assert first_pushable(shard_version=40, kept=range(38, 45), next_version=47) == 47


def test_a_worker_with_a_gap_in_its_kept_pushes_pushes_from_after_the_gap() -> None:
    # 43 closed without it (a deadline, a deferral): the shard must not wait for its 43
    assert first_pushable(shard_version=40, kept={40, 41, 42, 44, 45, 46}, next_version=47) == 44


def test_a_shard_at_the_newest_version_waits_for_nothing_missing() -> None:
    assert first_pushable(shard_version=47, kept=(), next_version=47) is None


@pytest.fixture(scope="module")
def prepared() -> PreparedJob:
    return prepare_job(
        {
            "job_id": "w",
            "type": "train",
            "model": {"arch": "mlp", "config": {"hidden": [8]}},
            "dataset": {"uri": "builtin:digits"},
            "training": {"steps": 50, "workers": 2, "shards": 2},
        },
        limits=Limits(1000, max_workers=2, max_shards=2),
    )


def _params(prepared: PreparedJob, shard: int, version: int) -> ShardParams:
    size = prepared.plan.partitions[shard].size
    return ShardParams(version, np.zeros(size, dtype=np.float32), False)


@pytest.fixture
def skewed(prepared: PreparedJob) -> WorkerJob:
    """A fresh worker whose partition 1 was sent version 40 (its shard resumed from an older
    checkpoint) while partition 0 is at 47."""
    job = WorkerJob(
        prepared.plan, 1, prepared.state, prepared.dataset, chunk_bytes=1 << 20, overlap_min_bytes=0
    )
    job.receive(0, _params(prepared, 0, 47))
    job.receive(1, _params(prepared, 1, 40))
    return job


def test_a_worker_computes_only_on_one_version_of_every_partition(
    prepared: PreparedJob, skewed: WorkerJob
) -> None:
    assert not skewed.ready()
    skewed.receive(1, _params(prepared, 1, 47))
    assert skewed.ready()


def test_a_fresh_worker_tells_the_shard_behind_to_expect_it_from_the_newest_version(
    skewed: WorkerJob,
) -> None:
    assert skewed.pushes_from(1, 40, kept=()) == 47
    assert skewed.pushes_from(0, 47, kept=()) is None


def test_a_deferred_workers_push_below_its_version_is_dropped() -> None:
    core = _core(workers=2)
    core.defer(1, 2, now_ms=0)
    assert core.offer(_grad(1, 0, value=3.0), now_ms=1) is Verdict.STALE
    core.offer(_grad(0, 0), now_ms=2)
    assert core.version == 1
    np.testing.assert_array_equal(core.theta, np.full(core.partition.size, -1.0))


def _shard_serving(
    prepared: PreparedJob, version: int
) -> tuple[ShardService, ShardJob, SentEvents]:
    """A shard serving partition 1 at ``version``, both ranks joined (no network: the
    statuses it sends are recorded)."""
    service, sent = ShardService(Settings(auth=False)), SentEvents()
    service._reporter = StatusReporter(sent, "aggregator-t")  # type: ignore[arg-type]
    plan = prepared.plan
    size = plan.partitions[1].size
    job = ShardJob(
        plan,
        1,
        Assignment("w", 1, {0: "w-0", 1: "w-1"}, {0: "s-0", 1: "s-1"}, {}),
        ShardCore(plan, 1, np.zeros(size, dtype=np.float32), now_ms=0, version=version),
        GradientAssembler(plan.training.gradient_codec, size),
        started_ms=0,
        checkpointed_version=version,
        durable_version=version,
    )
    job.peers = {rank: Peer("w", 1, rank) for rank in (0, 1)}
    service.jobs[("w", 1)] = job
    return service, job, sent


async def test_a_shard_told_a_rank_pushes_later_goes_on_without_it_and_says_so(
    prepared: PreparedJob,
) -> None:
    service, job, sent = _shard_serving(prepared, version=40)
    await service.on_pushes_from(job.peers[1], 43)
    await service._reporter.drain()  # statuses go out in the background
    assert job.core.members == {0}
    (status,) = sent.sent
    assert "worker 1 can push partition 1 from version 43 on only" in status["workers"]["change"]
    assert "versions 40..42 go on without that rank" in status["workers"]["change"]


async def test_a_shard_ignores_pushes_from_of_a_stream_no_longer_holding_the_rank(
    prepared: PreparedJob,
) -> None:
    service, job, sent = _shard_serving(prepared, version=40)
    await service.on_pushes_from(Peer("w", 1, 1), 43)  # an older stream of rank 1
    job.assignment.workers.pop(0)  # the coordinator took rank 0 away
    await service.on_pushes_from(job.peers[0], 43)
    await service._reporter.drain()
    assert job.core.members == {0, 1} and not sent.sent


async def test_a_repeated_pushes_from_is_one_status_and_a_negative_one_is_refused(
    prepared: PreparedJob,
) -> None:
    service, job, sent = _shard_serving(prepared, version=40)
    for _ in range(3):
        await service.on_pushes_from(job.peers[1], 43)
    with pytest.raises(InvalidArgument, match="pushes_from.version is -1; it must be >= 0"):
        await service.on_pushes_from(job.peers[1], -1)
    await service._reporter.drain()
    assert len(sent.sent) == 1


async def test_a_rank_that_joins_again_is_waited_for_until_its_new_stream_defers_it(
    prepared: PreparedJob,
) -> None:
    service, job, _ = _shard_serving(prepared, version=40)
    await service.on_pushes_from(job.peers[1], 43)
    await service.attach(pb.Join(job_id="w", worker=1, shard=1, member="w-1"))
    assert job.core.members == {0, 1} and job.core.deferred(1) is None


class LandingOnCue:
    """A shard's training store whose checkpoint writes land when the test says (no network)."""

    def __init__(self) -> None:
        self.land = asyncio.Event()
        self.landed: ck.Pointer | None = None

    async def write_checkpoint(
        self, job_id: str, partition: int, version: int, data: bytes, pointer: ck.Pointer
    ) -> None:
        await self.land.wait()
        self.landed = pointer

    async def pointer(self, job_id: str, partition: int) -> ck.Pointer | None:
        return self.landed


async def test_the_final_version_goes_out_only_once_its_checkpoint_landed(
    prepared: PreparedJob,
) -> None:
    # Workers leave a job once every partition is final and drop what they kept: a shard dying
    # between sending it and the checkpoint landing would leave nobody to replay its steps.
    target = prepared.plan.target_version
    service, job, _ = _shard_serving(prepared, version=target - 1)
    writes = LandingOnCue()
    service._checkpoints = CheckpointWriter(
        writes, service._reporter, service.metrics.checkpoints, 0
    )  # type: ignore[arg-type]
    job.core.remove(0, now_ms=0)
    job.core.remove(1, now_ms=0)
    job.core.add(0)
    size = job.core.partition.size
    job.core.offer(
        Contribution(0, target - 1, 4, lambda: DenseGradient(np.zeros(size, np.float32))), 0
    )
    assert job.core.done
    await service._advanced(job)
    await asyncio.sleep(0.05)
    assert job.peers[0].outbox.empty()  # nothing final sent while the write is on its way
    writes.land.set()
    await asyncio.wait_for(service._finishing.get(("w", 1)) or asyncio.sleep(0), 5)
    frames = []
    while not job.peers[0].outbox.empty():
        frames.append(job.peers[0].outbox.get_nowait())
    assert frames[-1] is None  # the stream ends after the final version
    assert read_shard_message(frames[0]).params.final


def _link(shard: int) -> ShardLink:
    return ShardLink(
        job_id="w",
        worker=1,
        member="w-1",
        shard=shard,
        partition_size=4,
        settings=Settings(auth=False),
        address=lambda partition: "127.0.0.1:1",
        on_params=lambda shard, params: None,
    )


def test_a_worker_cut_off_from_a_finished_partition_says_it_pushes_nothing_more(
    prepared: PreparedJob,
) -> None:
    # This process joined after partition 0 finished (its shard answers "over" without
    # parameters): it can never compute again, so partition 1 must not wait for it.
    fresh = WorkerJob(
        prepared.plan, 1, prepared.state, prepared.dataset, chunk_bytes=1 << 20, overlap_min_bytes=0
    )
    fresh.receive(1, _params(prepared, 1, 49))
    finished, running = _link(0), _link(1)
    finished.over, running.shard_version = True, 49
    said: list[int | None] = []
    running.declare = said.append  # type: ignore[method-assign,assignment]
    Running(fresh, SimpleNamespace(), [finished, running]).declare_pushes_from()  # type: ignore[arg-type]
    assert said == [prepared.plan.target_version]
