"""Service cores without a network: the worker's step bookkeeping and when its gradient pieces
leave, role and id parsing, and the shard process staying free of torch."""

from __future__ import annotations

import gc
import subprocess
import sys
import weakref
from collections.abc import Callable

import numpy as np
import pytest

from maas.config import Settings
from maas.errors import InvalidArgument
from maas.training.broadcast import ShardParams
from maas.training.plan import JobPlan
from maas.training.prepare import Limits, PreparedJob, prepare_job
from maas.training.protocol import OutgoingPush, read_push
from maas.training.v1 import training_pb2 as pb
from maas.training.worker import WorkerJob
from services.aggregator.__main__ import build
from services.gradient_worker.link import ShardLink


def _prepare(codec: str) -> PreparedJob:
    return prepare_job(
        {
            "job_id": "w",
            "type": "train",
            "model": {"arch": "mlp", "config": {"hidden": [8]}},
            "dataset": {"uri": "builtin:digits"},
            "training": {"steps": 5, "workers": 2, "shards": 2, "gradient_codec": codec},
        },
        limits=Limits(1000, max_workers=2, max_shards=2),
    )


@pytest.fixture(scope="module")
def prepared() -> PreparedJob:
    return _prepare("int8")


def _worker(prepared: PreparedJob, rank: int, overlap_min_bytes: int = 0) -> WorkerJob:
    return WorkerJob(
        prepared.plan,
        rank,
        prepared.state,
        prepared.dataset,
        chunk_bytes=1 << 20,
        overlap_min_bytes=overlap_min_bytes,
    )


@pytest.fixture
def job(prepared: PreparedJob) -> WorkerJob:
    return _worker(prepared, 1)


def _collect() -> tuple[list[tuple[int, pb.Push]], Callable[[int, OutgoingPush], None]]:
    """What a worker emits, read back as a shard reads it."""
    sent: list[tuple[int, pb.Push]] = []
    return sent, lambda shard, push: sent.append((shard, read_push(push.frame).push))


def _params(job: WorkerJob, shard: int, version: int, final: bool = False) -> ShardParams:
    size = job.plan.partitions[shard].size
    return ShardParams(version, np.zeros(size, dtype=np.float32), final)


def test_a_worker_computes_once_per_new_version_of_every_shard(job: WorkerJob) -> None:
    assert job.receive(0, _params(job, 0, 0))
    assert not job.ready()  # shard 1 not heard from yet
    job.receive(1, _params(job, 1, 0))
    assert job.ready()
    sent, emit = _collect()
    batch = job.compute(job.take(), emit)
    assert not job.ready()
    assert [(shard, push.version) for shard, push in sent] == [(0, 0), (1, 0)]
    assert batch.samples == 32 and sent[0][1].samples == 32
    job.receive(0, _params(job, 0, 1))
    assert not job.ready()  # shard 1 still at the version already used
    job.receive(1, _params(job, 1, 1))
    assert job.ready() and job.take()[1].version == 1


def test_a_finished_jobs_model_is_freed_at_once_without_the_cycle_collector() -> None:
    prepared = _prepare("none")
    job = _worker(prepared, 0)
    for shard in range(2):
        job.receive(shard, _params(job, shard, 0))
    job.compute(job.take(), lambda shard, push: None)  # the gradient hooks have run
    gone = weakref.ref(job.replica)  # the model, its flat parameters and gradients
    gc.disable()
    try:
        del job
        assert gone() is None  # a long-lived worker keeps no finished job's model
    finally:
        gc.enable()


def _events_of_a_step(job: WorkerJob) -> list[str]:
    """Backward's start and end and every push, in the order they happened."""
    for shard in range(2):
        job.receive(shard, _params(job, shard, 0))
    events: list[str] = []
    job.replica.backward = _spy(job.replica.backward, events)  # type: ignore[method-assign]
    job.compute(
        job.take(),
        lambda shard, push: events.append(f"push {shard}@{read_push(push.frame).push.offset}"),
    )
    return events


def test_lossless_codecs_send_each_tensor_from_inside_backward_last_layer_first() -> None:
    size = _prepare("none").plan.layout.size * 4
    job = _worker(_prepare("none"), 0, overlap_min_bytes=size)  # the model is just big enough
    events = _events_of_a_step(job)
    assert events[0] == "backward starts" and events[-1] == "backward ends"
    pushes = events[1:-1]
    assert len(pushes) == job.pieces[0].pieces + job.pieces[1].pieces
    # The head (last layer, shard 1 under a horizontal split) is the first gradient out.
    assert pushes[0].startswith("push 1@")


def test_a_model_under_the_overlap_size_sends_each_partition_whole_after_backward() -> None:
    size = _prepare("none").plan.layout.size * 4
    job = _worker(_prepare("none"), 0, overlap_min_bytes=size + 1)
    events = _events_of_a_step(job)
    assert events[:2] == ["backward starts", "backward ends"]
    # One piece per shard: the partition cut by chunk size (1 MiB), not by tensor.
    assert events[2:] == ["push 0@0", "push 1@0"]


def _spy(backward: Callable[..., None], events: list[str]) -> Callable[..., None]:
    def spied(*args: object) -> None:
        events.append("backward starts")
        backward(*args)
        events.append("backward ends")

    return spied


def test_older_or_repeated_parameters_are_ignored(job: WorkerJob) -> None:
    job.receive(0, _params(job, 0, 7))
    assert not job.receive(0, _params(job, 0, 6))
    assert not job.receive(0, _params(job, 0, 7))
    assert job.receive(0, _params(job, 0, 7, final=True))


def test_a_job_is_finished_when_every_shard_is_final(job: WorkerJob) -> None:
    job.receive(1, _params(job, 1, 9))
    job.receive(0, _params(job, 0, 9, final=True))
    assert not job.finished
    job.receive(1, _params(job, 1, 9, final=True))
    assert job.finished and not job.ready()


def test_a_bad_aggregator_role_is_named() -> None:
    with pytest.raises(InvalidArgument, match="MAAS_AGGREGATOR_ROLE='leader' is unknown"):
        build(Settings(), {"MAAS_AGGREGATOR_ROLE": "leader"})


def test_an_aggregator_shard_never_loads_torch() -> None:
    # torch alone is ~0.5 GB of resident memory: a shard's budget is its partition, not that.
    code = (
        "import sys; from maas.config import Settings; from services.aggregator.__main__ "
        "import build; build(Settings(), {}); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_link_keeps_its_pushes_until_a_checkpoint_covers_their_version() -> None:
    got: list[tuple[int, ShardParams]] = []
    link = ShardLink(
        job_id="j",
        worker=0,
        member="w",
        shard=1,
        partition_size=3,
        settings=Settings(),
        address=lambda partition: "",  # never dialled here
        on_params=lambda shard, params: got.append((shard, params)),
    )
    for version in (4, 5, 6):
        link.push(OutgoingPush(version, b"frame"))
    assert link.retained == 3

    def params(version: int, durable: int) -> bytes:
        values = np.ones(3, dtype=np.float32).tobytes()
        piece = pb.Params(
            version=version, durable_version=durable, dtype="float32", pieces=1, values=values
        )
        return pb.ShardMessage(params=piece).SerializeToString()

    link.receive(params(6, durable=5))
    assert link.retained == 2  # version 4 can never be asked for again
    assert [(shard, p.version) for shard, p in got] == [(1, 6)] and not link.over
    link.receive(params(7, durable=7))
    assert link.retained == 0


def test_a_stalled_job_fails_while_an_outage_is_waited_out() -> None:
    from maas.errors import InvalidArgument, Unavailable
    from services.aggregator.monitor import JobStalled, ends_the_job

    assert ends_the_job(JobStalled("no progress for 600000 ms"))
    assert ends_the_job(InvalidArgument("training.steps=0 must be at least 1"))
    assert not ends_the_job(Unavailable("S3 is unreachable"))


def _plan_with_lr(lr: float) -> JobPlan:
    from maas.training.prepare import Limits, prepare_job

    job = {
        "job_id": "j",
        "type": "train",
        "model": {"name": "m", "arch": "mlp", "config": {"hidden": [8]}},
        "dataset": {"uri": "builtin:digits"},
        "training": {"steps": 3, "optimizer": {"name": "sgd", "lr": lr}},
    }
    return prepare_job(job, limits=Limits(1000)).plan


def test_a_model_whose_held_out_loss_is_not_a_number_fails_the_job_saying_it_diverged() -> None:
    from maas.errors import FailedPrecondition
    from services.aggregator.finish import check_diverged

    plan = _plan_with_lr(1e30)
    check_diverged(plan, {"loss": 0.3, "accuracy": 0.9}, initial_loss=2.3)
    diverged = r"diverged: held-out loss .*optimizer\.lr \(it is 1e\+30\)"
    with pytest.raises(FailedPrecondition, match=diverged):
        check_diverged(plan, {"loss": float("nan"), "accuracy": 0.1}, initial_loss=2.3)


def test_a_model_whose_loss_blew_up_but_stayed_finite_fails_the_job_saying_it_diverged() -> None:
    # lr 1e6 trained to a held-out loss of 3.4e6, at chance, and was registered as succeeded.
    from maas.errors import FailedPrecondition
    from services.aggregator.finish import check_diverged

    plan = _plan_with_lr(1e6)
    check_diverged(plan, {"loss": 8.0, "accuracy": 0.5}, initial_loss=2.3)  # over-fit, not lost
    rose = r"the held-out loss rose from 2\.3 \(the starting weights\) to 3\.4e\+06 after 3 steps"
    with pytest.raises(FailedPrecondition, match=rose):
        check_diverged(plan, {"loss": 3.4e6, "accuracy": 0.11}, initial_loss=2.3)
