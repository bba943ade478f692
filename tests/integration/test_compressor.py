"""The compressor as a real process: compress jobs on the real broker, parents and variants in
the real registry and S3, statuses and dead letters read back from Kafka."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from training_jobs import Watcher

from infra.harness.serving import ServiceProcesses
from infra.proc import free_port
from infra.stack import PythonService
from maas import events, jobs, topics, zoo
from maas.bus import EventProducer
from maas.bus_consumer import EventConsumer
from maas.compression.train import FitConfig, Tensors, evaluate, fit
from maas.datasets import load_builtin
from maas.registry import RegistryClient
from maas.store import ObjectStore
from services.compressor.service import GROUP_ID as COMPRESSOR_GROUP

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

DIGITS = {"uri": "builtin:digits"}


@pytest.fixture(scope="module")
def services(stack, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("compressor")
    with ServiceProcesses(workdir) as processes:
        registry = processes.start_registry()
        compressor = PythonService(
            "compressor",
            "services.compressor",
            "127.0.0.1",
            free_port(),
            workdir,
            {"MAAS_REGISTRY_ADDR": registry},
        )
        compressor.env["MAAS_METRICS_PORT"] = str(compressor.port)
        compressor.start(timeout_s=120)  # ready once /metrics answers: it is consuming
        try:
            yield registry, compressor
        finally:
            compressor.stop()


@pytest.fixture(scope="module")
async def registry(stack, services):
    async with RegistryClient(
        stack.settings.replace(registry_addr=services[0]), actor="test"
    ) as client:
        yield client


@pytest.fixture(scope="module")
async def producer(stack):
    async with EventProducer(stack.settings, client_id="test-compressor") as p:
        yield p


@pytest.fixture(scope="module")
async def watcher(stack, producer):
    watcher = Watcher()
    consumer = EventConsumer(
        stack.settings,
        topics=[topics.JOB_STATUS, topics.DLQ],
        group_id=f"test-compressor-{uuid.uuid4().hex[:8]}",
        handler=watcher.handle,
        producer=producer,
    )
    await consumer.start()
    task = asyncio.create_task(consumer.run())
    yield watcher
    await consumer.stop()
    await asyncio.gather(task, return_exceptions=True)


@pytest.fixture(scope="module")
def digits() -> Tensors:
    return Tensors.of(load_builtin("digits"))


@pytest.fixture(scope="module")
async def parent(registry, digits):
    model = fit(zoo.build("mlp", {}, seed=0), digits, FitConfig(steps=400, seed=0))
    name = f"cmp-{uuid.uuid4().hex[:8]}"
    return await registry.register(
        model, name, "mlp", {}, method="train", settings={"dataset": DIGITS}
    )


def compress_job(base: dict, methods: list[dict], **fields) -> dict:
    job_id = f"compress-{uuid.uuid4().hex[:10]}"
    return events.new_event(
        events.JOB,
        job_id=job_id,
        type="compress",
        base=base,
        compress={"methods": methods},
        **fields,
    )


async def submit(producer, base: dict, methods: list[dict], **fields) -> str:
    job = compress_job(base, methods, **fields)
    await producer.send(topics.JOBS, job, key=job["job_id"])
    return job["job_id"]


async def test_a_compress_job_registers_one_measured_variant_per_method(
    registry, producer, watcher, parent, digits
):
    methods = [
        {"quantize": {"dtype": "int8"}},
        {"prune": {"sparsity": 0.8, "recovery_steps": 100}},
        {
            "chain": [
                {"prune": {"sparsity": 0.8, "recovery_steps": 100}},
                {"quantize": {"dtype": "int8"}},
            ]
        },
        {"distill": {"steps": 300}},
    ]
    job_id = await submit(producer, {"name": parent.name, "version": parent.version}, methods)
    final = await watcher.final(job_id)
    assert final["state"] == "succeeded", final
    variants = [s["model"] for s in watcher.statuses[job_id] if s["state"] == "running"]
    assert len(variants) == 4
    for ref, method in zip(
        variants, ["quantize", "prune", "prune+quantize", "distill"], strict=True
    ):
        version = await registry.get(f"{ref['name']}@{ref['version']}")
        assert (version.method, version.job_id, version.parent) == (method, job_id, parent.ref)
        # The shared loader runs the variant and it scores what its registered metrics claim.
        loaded = await registry.load(version.ref)
        assert evaluate(loaded, digits)["accuracy"] == pytest.approx(version.metrics["accuracy"])
        assert version.metrics["compression_ratio"] > 1


async def test_variants_appear_in_the_parents_lineage(registry, producer, watcher, parent):
    job_id = await submit(
        producer,
        {"name": parent.name, "version": parent.version},
        [{"quantize": {"dtype": "fp16"}}],
    )
    final = await watcher.final(job_id)
    assert final["state"] == "succeeded", final
    lineage = await registry.lineage(parent.ref)
    assert final["model"]["version"] in [
        child.version for child in lineage.children if child.method == "quantize"
    ]


async def test_a_job_on_a_missing_model_fails_with_a_clear_status(producer, watcher):
    job_id = await submit(producer, {"name": "no-such-model"}, [{"quantize": {}}], dataset=DIGITS)
    final = await watcher.final(job_id)
    assert final["state"] == "failed"
    assert final["error"]["code"] == "not_found"
    assert "no-such-model" in final["error"]["message"]
    # The dead letter is written before the status, but on another topic: it may arrive after.
    assert await watcher.letters(job_id, COMPRESSOR_GROUP), "the refused job is kept in the DLQ"


async def test_a_malformed_compress_job_fails_naming_the_field(producer, watcher, parent):
    job = compress_job({"name": parent.name}, [{"prune": {"sparsity": 1.5}}])
    job_id = job["job_id"]
    # Past the producer's own validation, as any Kafka tool could publish it.
    await producer.send_raw(topics.JOBS, events.encode(job), key=job_id)
    final = await watcher.final(job_id)
    assert (final["state"], final["error"]["code"]) == ("failed", "schema_violation")
    assert "sparsity" in final["error"]["message"]


async def test_a_tampered_parent_artifact_is_refused(stack, registry, producer, watcher, digits):
    model = fit(zoo.build("mlp", {}, seed=1), digits, FitConfig(steps=50, seed=1))
    victim = await registry.register(
        model, f"cmp-tampered-{uuid.uuid4().hex[:8]}", "mlp", {}, settings={"dataset": DIGITS}
    )
    store = ObjectStore(stack.settings)
    key = victim.key("weights.safetensors")
    data = bytearray(store.get_bytes(victim.bucket, key))
    data[-1] ^= 0xFF
    store.put_bytes(victim.bucket, key, bytes(data))  # a consistent-looking object, wrong bytes
    job_id = await submit(
        producer, {"name": victim.name, "version": victim.version}, [{"quantize": {}}]
    )
    final = await watcher.final(job_id)
    assert (final["state"], final["error"]["code"]) == ("failed", "integrity")
    assert "sha256" in final["error"]["message"]


async def test_a_cancel_event_ends_a_running_compress_job_keeping_its_registered_variants(
    registry, producer, watcher, parent
):
    base = {"name": parent.name, "version": parent.version}
    # 30 variants (each its own: a job lists a variant once): long enough to cancel part-way.
    methods = [{"prune": {"sparsity": round(0.02 * (i + 1), 2)}} for i in range(30)]
    job_id = await submit(producer, base, methods)
    await watcher.state(job_id, "running", timeout_s=120)
    cancel = events.new_event(events.JOB, job_id=job_id, type=jobs.CANCEL)
    await producer.send(topics.JOBS, cancel, key=job_id)
    final = await watcher.final(job_id)
    assert final["state"] == "cancelled", final
    assert 1 <= final["step"] < len(methods)
    registered = [v async for v in registry.iter_versions(parent.name) if v.job_id == job_id]
    assert len(registered) == final["step"]


async def test_a_job_arriving_while_another_runs_is_told_queued_behind_it(
    producer, watcher, parent
):
    base = {"name": parent.name, "version": parent.version}
    methods = [{"prune": {"sparsity": round(0.02 * (i + 1), 2)}} for i in range(30)]
    running = await submit(producer, base, methods)
    await watcher.state(running, "running", timeout_s=120)
    waiting = await submit(producer, base, [{"quantize": {"dtype": "fp16"}}])
    queued = await watcher.state(waiting, "queued", timeout_s=60)
    assert f"waiting for compress job {running} to finish" in queued["reason"]
    cancel = events.new_event(events.JOB, job_id=running, type=jobs.CANCEL)
    await producer.send(topics.JOBS, cancel, key=running)
    assert (await watcher.final(running))["state"] == "cancelled"
    assert (await watcher.final(waiting))["state"] == "succeeded"
    assert [s["state"] for s in watcher.statuses[waiting]][:2] == ["queued", "accepted"]


async def test_a_job_cancelled_while_no_compressor_runs_never_starts(
    services, producer, watcher, parent
):
    _, compressor = services
    # In threads: the watcher's consumer must keep heartbeating while a compressor starts.
    await asyncio.to_thread(compressor.stop)
    try:
        base = {"name": parent.name, "version": parent.version}
        job_id = await submit(producer, base, [{"quantize": {"dtype": "int8"}}])
        cancel = events.new_event(events.JOB, job_id=job_id, type=jobs.CANCEL)
        await producer.send(topics.JOBS, cancel, key=job_id)
    finally:
        await asyncio.to_thread(compressor.start, timeout_s=120)
    final = await watcher.final(job_id)
    assert (final["state"], final["step"]) == ("cancelled", 0), final
    assert [s["state"] for s in watcher.statuses[job_id]] == ["cancelled"]
