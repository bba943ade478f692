"""What the tests of live training jobs share: a status/DLQ watcher, job events, the cluster of
real training processes, and reading a job's results, checkpoints and assignment."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from kafka_offsets import start_group_at_end

from infra.harness.serving import ServiceProcesses
from infra.harness.training import TrainingProcesses
from maas import events, topics
from maas.bus import EventProducer, Record
from maas.bus_consumer import EventConsumer
from maas.config import Settings
from maas.registry import RegistryClient
from maas.store import ObjectStore
from maas.training import checkpoint as ck
from maas.training.local import simulate
from maas.training.prepare import Limits, prepare_job
from maas.training.storage import BUCKET

TERMINAL = {"succeeded", "failed", "cancelled"}
# Members say `up` every second; six seconds of silence before one is removed leaves a loaded
# CI machine (4x slower) room to miss a few without disturbing the jobs whose weights are
# compared exactly, and keeps the worker-kill test short.
HEARTBEAT_TIMEOUT_MS = 6000
MLP_TRAINING = {
    "steps": 100,
    "batch_size": 32,
    "workers": 2,
    "shards": 2,
    "optimizer": {"name": "adam", "lr": 0.01},
    "checkpoint_every": 20,
}


@contextlib.contextmanager
def training_cluster(
    workdir: Path, workers: int = 2, shards: int = 2, **env: str
) -> Iterator[TrainingProcesses]:
    """A registry, the coordinator, ``shards`` shards and ``workers`` workers, all started;
    ``env`` adds settings to every one of them."""
    with ServiceProcesses(workdir) as processes:
        registry = processes.start_registry()
        with TrainingProcesses(
            workdir,
            registry,
            workers=workers,
            shards=shards,
            MAAS_PROGRESS_INTERVAL_MS="1000",
            MAAS_WORKER_HEARTBEAT_TIMEOUT_MS=str(HEARTBEAT_TIMEOUT_MS),
            **env,
        ) as training:
            training.start()
            yield training


def job_plane_fixtures(client_id: str) -> tuple[Any, Any]:
    """A test module's ``producer`` and ``watcher`` fixtures (module scope): a producer of job
    events named ``client_id``, and a Watcher of every status and dead letter from then on.
    Bind them at module level: ``producer, watcher = job_plane_fixtures("test-x")``."""

    @pytest.fixture(scope="module")
    async def producer(stack: Any) -> AsyncIterator[EventProducer]:
        async with EventProducer(stack.settings, client_id=client_id) as p:
            yield p

    @pytest.fixture(scope="module")
    async def watcher(stack: Any, producer: EventProducer) -> AsyncIterator[Watcher]:
        async with watching(stack.settings, producer) as w:
            yield w

    return producer, watcher


@dataclass
class Watcher:
    """Job statuses and dead letters as they arrive."""

    statuses: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    dead: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    producer: EventProducer | None = field(default=None, repr=False)  # see ``final``

    async def handle(self, record: Record) -> None:
        if record.topic == topics.JOB_STATUS.name:
            self.statuses[record.event["job_id"]].append(record.event)
        elif record.key is not None:
            self.dead[record.key].append(record.event)

    async def final(self, job_id: str, timeout_s: float = 150.0) -> dict[str, Any]:
        """The job's terminal status. A job that does not end in ``timeout_s`` is cancelled
        before the test fails: left running, it would hold its workers and fail every later
        test of the module that needs them."""
        if (done := await self._terminal(job_id, timeout_s)) is not None:
            return done
        seen = list(self.statuses[job_id])
        if self.producer is not None:
            cancel = events.new_event(events.JOB, job_id=job_id, type="cancel")
            await self.producer.send(topics.JOBS, cancel, key=job_id)
            await self._terminal(job_id, 60.0)
        raise AssertionError(f"job {job_id} did not finish (cancelled); statuses: {seen}")

    async def _terminal(self, job_id: str, timeout_s: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            done = [s for s in self.statuses[job_id] if s["state"] in TERMINAL]
            if done:
                return done[-1]
            await asyncio.sleep(0.2)
        return None

    async def letters(self, job_id: str, group: str, timeout_s: float = 60.0) -> list[dict]:
        """Dead letters of ``job_id`` written by ``group`` (they may trail the job's status)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = [d for d in self.dead[job_id] if d["consumer_group"] == group]
            if found:
                return found
            await asyncio.sleep(0.2)
        return []

    async def state(self, job_id: str, state: str, timeout_s: float = 60) -> dict[str, Any]:
        """The newest status of ``job_id`` in ``state``, once there is one."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = [s for s in self.statuses[job_id] if s["state"] == state]
            if found:
                return found[-1]
            await asyncio.sleep(0.1)
        raise AssertionError(f"job {job_id} never {state}: {self.statuses[job_id]}")


def train_job(
    name: str, arch: str, dataset: dict[str, Any], training: dict[str, Any], **fields: Any
) -> dict[str, Any]:
    return events.new_event(
        events.JOB,
        job_id=f"{name}-{uuid.uuid4().hex[:8]}",
        type="train",
        model={"name": name, "arch": arch, "config": fields.pop("config", {})},
        dataset=dataset,
        training=training,
        **fields,
    )


async def run(producer: EventProducer, watcher: Watcher, job: dict[str, Any]) -> dict[str, Any]:
    await producer.send(topics.JOBS, job, key=job["job_id"])
    return await watcher.final(job["job_id"])


async def weights(registry: RegistryClient, status: dict[str, Any]) -> dict[str, torch.Tensor]:
    model = status["model"]
    module = await registry.load(f"{model['name']}@{model['version']}")
    return module.state_dict()


async def pointer(store: ObjectStore, job_id: str, shard: int) -> ck.Pointer:
    data = await asyncio.to_thread(store.get_bytes, BUCKET, ck.pointer_key(job_id, shard))
    return ck.Pointer.from_json(data)


async def wait_for_checkpoint(
    store: ObjectStore, job_id: str, shard: int, version: int, timeout_s: float = 90
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        exists = await asyncio.to_thread(store.exists, BUCKET, ck.pointer_key(job_id, shard))
        if exists and (await pointer(store, job_id, shard)).version >= version:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"shard {shard} of {job_id} never checkpointed version {version}")


@contextlib.asynccontextmanager
async def watching(settings: Settings, producer: EventProducer) -> AsyncIterator[Watcher]:
    """A Watcher fed from the job-status and DLQ topics, from their current end (earlier tests,
    the fuzzers among them, leave poison on them)."""
    watcher = Watcher(producer=producer)
    group = f"test-training-{uuid.uuid4().hex[:8]}"
    for topic in (topics.JOB_STATUS, topics.DLQ):
        await start_group_at_end(settings, topic, group)
    consumer = EventConsumer(
        settings,
        topics=[topics.JOB_STATUS, topics.DLQ],
        group_id=group,
        handler=watcher.handle,
        producer=producer,
    )
    await consumer.start()
    task = asyncio.create_task(consumer.run())
    try:
        yield watcher
    finally:
        await consumer.stop()
        await asyncio.gather(task, return_exceptions=True)


def assignment(watcher: Watcher, job_id: str) -> dict[str, Any]:
    """The job's newest assignment, as the coordinator's statuses carry it."""
    found = [s["assignment"] for s in watcher.statuses[job_id] if "assignment" in s]
    assert found, f"job {job_id} was never assigned: {watcher.statuses[job_id]}"
    return max(found, key=lambda a: a["epoch"])


async def reference_weights(job: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The job run in this process by the real worker loop and shard cores (``simulate``), on
    one torch thread as the workers run it (OMP_NUM_THREADS=1: the same matmul blocking; two
    threads move a weight by ~1e-6 after 100 Adam steps). The thread count is set in the
    thread that computes: it is per thread, and an executor thread that already ran torch
    keeps the count it had then, whatever the event loop's thread sets."""
    prepared = prepare_job(job, limits=Limits(10_000))

    def run() -> dict[str, torch.Tensor]:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return simulate(prepared.plan, prepared.state, prepared.dataset)
        finally:
            torch.set_num_threads(threads)

    return await asyncio.to_thread(run)


def assert_same_weights(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(
            got[name],
            expected[name],
            rtol=0,
            atol=1e-6,
            msg=lambda why, name=name: f"{name}: {why}",
        )
