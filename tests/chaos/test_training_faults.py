"""Infrastructure faults in the middle of a training job, on the real stack: the Kafka broker
stopped, then the S3 server stopped, each while a 2-worker x 2-shard job trains (codec none,
quorum 1.0). Each job must end succeeded with exactly the weights of an undisturbed run of the
same job: no step lost or applied twice, however the outage fell. Then a stranger on a shard's
data plane (a join naming no member, NaN values, a version far ahead): each stream is refused
naming the problem, and the job still ends with the undisturbed weights. A forged assignment
of a running job fails it, naming the record, and frees its workers for the next job. Last,
malformed records on the control topic: the pool's consumer dead-letters each, and the next job
trains.

Outages last MAAS_CHAOS_BROKER_OUTAGE_S and MAAS_CHAOS_S3_OUTAGE_S seconds (CI: 10 each; the
issue's figures: 30 and 60).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import msgpack
import numpy as np
import pytest
from training_jobs import (
    MLP_TRAINING,
    Watcher,
    assert_same_weights,
    assignment,
    job_plane_fixtures,
    pointer,
    run,
    train_job,
    training_cluster,
    wait_for_checkpoint,
    weights,
)

from infra.harness.http import http_get
from infra.harness.training import TrainingProcesses
from infra.stack import PythonService
from maas import events, topics
from maas.bus import EventProducer
from maas.liveness import HEALTH_PATH
from maas.registry import RegistryClient
from maas.store import ObjectStore
from maas.training import dataplane
from maas.training.control import ASSIGNED, assignment_event
from maas.training.pool import Assignment
from maas.training.v1 import training_pb2 as pb
from services.aggregator.scheduler import GROUP_ID as POOL_GROUP

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

BROKER_OUTAGE_S = float(os.environ.get("MAAS_CHAOS_BROKER_OUTAGE_S", "10"))
S3_OUTAGE_S = float(os.environ.get("MAAS_CHAOS_S3_OUTAGE_S", "10"))
# Long enough that an outage starting at version 20 falls well inside the job.
TRAINING = {**MLP_TRAINING, "steps": 400}


@pytest.fixture(scope="module")
def cluster(stack, tmp_path_factory) -> Iterator[TrainingProcesses]:
    with training_cluster(tmp_path_factory.mktemp("training-faults")) as training:
        yield training


producer, watcher = job_plane_fixtures("test-training-faults")


@pytest.fixture(scope="module")
async def registry(stack, cluster) -> AsyncIterator[RegistryClient]:
    settings = stack.settings.replace(registry_addr=cluster.env["MAAS_REGISTRY_ADDR"])
    async with RegistryClient(settings, actor="test") as client:
        yield client


@pytest.fixture(scope="module")
async def undisturbed(cluster, producer, watcher, registry) -> dict[str, Any]:
    status = await run(
        producer, watcher, train_job("faults", "mlp", {"uri": "builtin:digits"}, TRAINING)
    )
    assert status["state"] == "succeeded", status
    return await weights(registry, status)


@dataclass
class Outage:
    durable: int  # partition 0's newest checkpoint when the part was cut off
    statuses: list[dict[str, Any]]  # the job's statuses that arrived while it was away


async def train_through(
    stack,
    producer: EventProducer,
    watcher: Watcher,
    stop: Callable[[], Any],
    start: Callable[[], Any],
    outage_s: float,
) -> tuple[dict[str, Any], Outage]:
    """Submit the job, cut a part off once partition 0 checkpointed version 20, bring it back
    after ``outage_s``; the job's final status, and what happened meanwhile."""
    job = train_job("faults", "mlp", {"uri": "builtin:digits"}, TRAINING)
    job_id = job["job_id"]
    await producer.send(topics.JOBS, job, key=job_id)
    store = ObjectStore(stack.settings)
    await wait_for_checkpoint(store, job_id, shard=0, version=20)
    durable = await pointer(store, job_id, shard=0)
    assert not durable.final, "the fault came too late"
    # The outage starts as the part is being stopped: a shard may meet it, and hold the job
    # saying why, before stop() returns (CI saw that status land before a count taken after).
    seen = len(watcher.statuses[job_id])
    await asyncio.to_thread(stop)
    try:
        await asyncio.sleep(outage_s)
    finally:
        during = watcher.statuses[job_id][seen:]
        await asyncio.to_thread(start)
    return await watcher.final(job_id, timeout_s=300), Outage(durable.version, during)


async def test_a_job_survives_the_broker_stopping_mid_job_and_ends_exactly(
    stack, producer, watcher, registry, undisturbed
):
    kafka = stack.local.kafka
    status, _ = await train_through(
        stack, producer, watcher, kafka.stop, kafka.start, BROKER_OUTAGE_S
    )
    assert status["state"] == "succeeded", status
    assert_same_weights(await weights(registry, status), undisturbed)
    # Nobody could be heard, so nobody was declared gone: a silent broker is not dead members.
    reasons = [s.get("reason", "") for s in watcher.statuses[status["job_id"]]]
    assert not [r for r in reasons if "removed" in r], reasons


async def test_a_job_survives_s3_stopping_mid_job_and_ends_exactly(
    stack, producer, watcher, registry, undisturbed
):
    s3 = stack.local.s3
    status, _ = await train_through(stack, producer, watcher, s3.cut_off, s3.start, S3_OUTAGE_S)
    assert status["state"] == "succeeded", status
    assert_same_weights(await weights(registry, status), undisturbed)


async def test_while_s3_is_away_a_job_goes_at_most_two_checkpoint_intervals_further(
    stack, producer, watcher
):
    """Workers keep every push since the newest durable checkpoint (to replay them to a
    restarted shard): with no checkpoint landing, the shards hold the job there instead of
    letting that backlog grow for the whole outage, and say why in its status."""
    s3 = stack.local.s3
    status, outage = await train_through(
        stack, producer, watcher, s3.cut_off, s3.start, S3_OUTAGE_S
    )
    assert status["state"] == "succeeded", status
    every = TRAINING["checkpoint_every"]
    # Two intervals and the step that found the hold, plus one interval for a checkpoint whose
    # write may have landed between reading the pointer and stopping S3. Without the hold the
    # job runs on to its end (its 400 steps take a second or two) and reports no progress.
    bound = outage.durable + 3 * every + 1
    # The shards' progress (the coordinator's own "waiting: ..." notes carry no step).
    steps = [s["step"] for s in outage.statuses if s["state"] == "running" and "step" in s]
    assert steps and max(steps) <= bound, (bound, outage.statuses)
    if steps.count(max(steps)) > 1:  # it stood still there, held: its status says why
        reasons = [s.get("reason", "") for s in outage.statuses if s.get("step") == max(steps)]
        assert any("waiting for a checkpoint to land in S3" in r for r in reasons), reasons


def control_poison() -> dict[str, tuple[bytes, list[tuple[str, bytes | None]]]]:
    """Malformed records for the control topic, by case: (value, headers)."""
    member = events.new_event(
        events.MEMBER, member_id="poison-worker", kind="worker", state="up", address=""
    )
    assignment = events.new_event(
        events.ASSIGNMENT, job_id="poison-job", state="assigned", epoch=1, workers=[], shards=[]
    )
    json_header = ("content-type", b"application/json")
    return {
        "random-bytes": (b"\x93\xff\x00 not an event", []),
        "json-header-on-msgpack": (events.encode(member), [json_header, ("trace", None)]),
        "schema-not-text": (events.encode(dict(member, schema=7)), [("x", None)]),
        "member-without-id": (
            events.encode({k: v for k, v in member.items() if k != "member_id"}),
            [],
        ),
        "assignment-epoch-text": (events.encode(dict(assignment, epoch="one")), []),
        "nested-too-deep": (b'{"a":' + b"[" * 40 + b"]" * 40 + b"}", [json_header]),
        "not-a-map": (msgpack.packb([1, 2, 3]), []),
    }


@contextlib.contextmanager
def frozen(services: list[PythonService]) -> Iterator[None]:
    """The services stopped (SIGSTOP) for a moment shorter than a heartbeat timeout."""
    pids = [service.process.pid() for service in services]
    assert None not in pids, "a service to freeze is not running"
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def _stranger_frames(member: str, **push: object) -> list[bytes]:
    join = pb.WorkerMessage(
        join=pb.Join(job_id=push.pop("job_id"), worker=0, shard=0, member=member)
    )
    frames = [join.SerializeToString()]
    if push:
        fields = {"codec": "none", "offset": 0, "size": 4, "piece": 0, "pieces": 1, "samples": 1}
        frames.append(pb.WorkerMessage(push=pb.Push(**{**fields, **push})).SerializeToString())
    return frames


async def _refusal(address: str, settings, frames: list[bytes]) -> tuple[grpc.StatusCode, str]:
    async with dataplane.open_channel(address, settings) as channel:
        call = dataplane.exchange(channel, settings)
        try:
            for frame in frames:
                await call.write(frame)
            while await asyncio.wait_for(call.read(), 30) is not grpc.aio.EOF:
                pass  # the parameters a join is answered with
        except grpc.aio.AioRpcError as ended:
            return ended.code(), ended.details() or ""
        return await call.code(), await call.details()


async def test_a_strangers_streams_are_refused_and_the_job_ends_exactly(
    stack, cluster, producer, watcher, registry, undisturbed
):
    job = train_job("faults", "mlp", {"uri": "builtin:digits"}, TRAINING)
    job_id = job["job_id"]
    await producer.send(topics.JOBS, job, key=job_id)
    await wait_for_checkpoint(ObjectStore(stack.settings), job_id, shard=0, version=20)
    placed = assignment(watcher, job_id)
    address = next(s["address"] for s in placed["shards"] if s["partition"] == 0)
    holder = next(w["member"] for w in placed["workers"] if w["rank"] == 0)
    # Besides the operator's token, they come with the services' own: a faulty worker, or a
    # stolen token.
    services = stack.settings.replace(
        auth_token_file=str(Path(stack.settings.auth_token_file).with_name("services.token"))
    )
    nan = np.full(4, np.nan, dtype=np.float32).tobytes()
    cases = {
        "join.member is empty": _stranger_frames("", job_id=job_id),
        "hold NaN or inf": _stranger_frames(holder, job_id=job_id, version=20, values=nan),
        "past the shard's": _stranger_frames(
            holder, job_id=job_id, version=10**12, values=bytes(16)
        ),
    }
    with frozen(cluster.workers):  # the job could end meanwhile: it trains 400 steps in ~3 s
        operator = await _refusal(address, stack.settings, cases["join.member is empty"])
        assert operator == (
            grpc.StatusCode.PERMISSION_DENIED,
            "'admin' has role write; Exchange needs service",
        )
        for named, frames in cases.items():
            code, details = await _refusal(address, services, frames)
            assert (code, named in details) == (grpc.StatusCode.INVALID_ARGUMENT, True), details
    final = await watcher.final(job_id, timeout_s=300)
    assert final["state"] == "succeeded", final
    assert_same_weights(await weights(registry, final), undisturbed)


async def test_a_forged_assignment_fails_the_job_naming_it_and_frees_its_workers(
    stack, cluster, producer, watcher
):
    job = train_job("faults", "mlp", {"uri": "builtin:digits"}, TRAINING)
    job_id = job["job_id"]
    await producer.send(topics.JOBS, job, key=job_id)
    await wait_for_checkpoint(ObjectStore(stack.settings), job_id, shard=0, version=20)
    ghosts = Assignment(
        job_id, epoch=999, workers={0: "ghost-w0", 1: "ghost-w1"},
        shards={0: "ghost-s0", 1: "ghost-s1"}, addresses={0: "127.0.0.1:1", 1: "127.0.0.1:1"},
    )  # fmt: skip
    await producer.send(topics.TRAINING_CONTROL, assignment_event(ghosts, ASSIGNED), key=job_id)
    final = await watcher.final(job_id, timeout_s=120)
    assert final["state"] == "failed", final
    assert "did not write (epoch 999" in final["error"]["message"], final
    after = train_job("faults", "mlp", {"uri": "builtin:digits"}, {**MLP_TRAINING, "steps": 20})
    assert (await run(producer, watcher, after))["state"] == "succeeded"  # the pool is free


async def workers_in_pool(cluster: TrainingProcesses, count: int) -> None:
    """Wait until the coordinator counts ``count`` live gradient workers in its pool."""
    gauge = f'maas_training_pool_members{{kind="worker"}} {float(count)}'
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while gauge not in (await asyncio.to_thread(http_get, cluster.coordinator.port, "/metrics"))[1]:
        assert loop.time() < deadline, f"the pool never counted {count} workers"
        await asyncio.sleep(0.2)


async def health_saying(port: int, words: str) -> str:
    """The ``/healthz`` body of the process on ``port`` once it contains ``words``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while True:
        _, body = await asyncio.to_thread(http_get, port, HEALTH_PATH)
        if words in body:
            return body
        assert loop.time() < deadline, f"/healthz never said {words!r}: {body}"
        await asyncio.sleep(0.2)


async def test_a_worker_with_a_wrong_token_fails_one_job_and_leaves_the_pool_saying_why(
    cluster, producer, watcher, tmp_path
):
    token = tmp_path / "wrong.token"
    token.write_text("a token of some other stack\n")
    cluster.use_workers(1)
    await workers_in_pool(cluster, 1)
    impostor = cluster.spawn(
        "gradient-worker-wrong-token",
        "services.gradient_worker",
        MAAS_AUTH_TOKEN_FILE=str(token),
        MAAS_WORKER_REJOIN_AFTER_MS="1000",
    )
    digits, short = {"uri": "builtin:digits"}, {**MLP_TRAINING, "steps": 20}
    try:
        await workers_in_pool(cluster, 2)  # the good one and the impostor: a job takes both
        # Long enough that the good worker cannot finish it alone before the failure lands.
        failed = await run(producer, watcher, train_job("faults", "mlp", digits, TRAINING))
        assert failed["state"] == "failed", failed
        assert "refused this gradient worker's token" in failed["error"]["message"], failed
        status, body = await asyncio.to_thread(http_get, impostor.port, HEALTH_PATH)
        assert (status, "out of the training pool" in body, "refused" in body) == (
            503,
            True,
            True,
        ), body
        await workers_in_pool(cluster, 1)  # the coordinator heard it leave
        # After its wait it asks the shard again, is refused again, and stays out.
        body = await health_saying(impostor.port, "still refuses")
        assert "then it offers itself again if the shard at 127.0.0.1:" in body, body
        await workers_in_pool(cluster, 1)
        # Two workers wanted, one enough: the pool gives it only the worker that can train.
        enough = {**short, "min_workers": 1}
        after = await run(producer, watcher, train_job("faults", "mlp", digits, enough))
        assert after["state"] == "succeeded", after
        assert impostor.process.alive()
    finally:
        impostor.stop()
        cluster.use_workers(2)


async def test_malformed_control_records_are_dead_lettered_by_the_pool_and_training_goes_on(
    stack, cluster, producer, watcher
):
    run_id = uuid.uuid4().hex[:8]
    cases = control_poison()
    for case, (value, headers) in cases.items():
        await producer.send_raw(
            topics.TRAINING_CONTROL, value, key=f"poison-{case}-{run_id}", headers=headers
        )
    for case in cases:
        letters = await watcher.letters(f"poison-{case}-{run_id}", POOL_GROUP)
        assert len(letters) == 1, f"{case}: {letters}"
        assert letters[0]["reason"]["code"] and letters[0]["reason"]["message"], letters[0]
    job = train_job("faults", "mlp", {"uri": "builtin:digits"}, {**MLP_TRAINING, "steps": 20})
    status = await run(producer, watcher, job)
    assert status["state"] == "succeeded", status
    assert all(p.process.alive() for p in cluster.everything)
