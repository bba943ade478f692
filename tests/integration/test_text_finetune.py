"""Transfer learning on text through the platform: imported MiniLM, a finetune job on the
distributed parameter server (real coordinator, gradient worker and two aggregator shards, the
parameters split vertically), the classifier registered with lineage and served with label names.

CI size: a few steps on a small fraction of builtin:stdlib-docs; bench/text.py measures the
accuracy of a full run.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as triton

from infra.harness.serving import ServiceProcesses
from infra.harness.training import TrainingProcesses
from maas import events, topics
from maas.bus import EventProducer, Record
from maas.bus_consumer import EventConsumer
from maas.cli_import import import_pretrained
from maas.registry import RegistryClient
from maas.text import corpus
from maas.text.pretrained import MINILM_PACKAGE

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1500)]

TERMINAL = {"succeeded", "failed"}


@pytest.fixture(scope="module")
def cluster(stack, tmp_path_factory) -> Iterator[tuple[TrainingProcesses, str]]:
    workdir = tmp_path_factory.mktemp("text-training")
    with ServiceProcesses(workdir) as processes:
        registry = processes.start_registry()
        inference = processes.start_inference("inference-text", registry, MAAS_AUTH="off")
        with TrainingProcesses(workdir, registry, workers=1, shards=2) as training:
            training.start()
            yield training, inference


@pytest.fixture(scope="module")
async def registry(stack, cluster) -> AsyncIterator[RegistryClient]:
    training, _ = cluster
    settings = stack.settings.replace(registry_addr=training.env["MAAS_REGISTRY_ADDR"])
    async with RegistryClient(settings, actor="test-text") as client:
        yield client


async def final_status(stack, job: dict[str, Any], timeout_s: float = 480.0) -> dict[str, Any]:
    statuses: dict[str, list[dict[str, Any]]] = defaultdict(list)

    async def handle(record: Record) -> None:
        statuses[record.event["job_id"]].append(record.event)

    async with EventProducer(stack.settings, client_id="test-text") as producer:
        consumer = EventConsumer(
            stack.settings,
            topics=[topics.JOB_STATUS],
            group_id=f"test-text-{uuid.uuid4().hex[:8]}",
            handler=handle,
            producer=producer,
        )
        await consumer.start()
        task = asyncio.create_task(consumer.run())
        try:
            await producer.send(topics.JOBS, job, key=job["job_id"])
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                done = [s for s in statuses[job["job_id"]] if s["state"] in TERMINAL]
                if done:
                    return done[-1]
                await asyncio.sleep(0.5)
        finally:
            await consumer.stop()
            await asyncio.gather(task, return_exceptions=True)
    raise AssertionError(f"job {job['job_id']} did not finish: {statuses[job['job_id']]}")


async def test_a_finetune_job_puts_a_classifier_head_on_imported_minilm(
    stack, cluster, registry
) -> None:
    _, inference = cluster
    base = f"it-minilm-{uuid.uuid4().hex[:6]}"
    imported = await import_pretrained(registry, MINILM_PACKAGE, base, alias="production")
    job = events.new_event(
        events.JOB,
        job_id=f"text-finetune-{uuid.uuid4().hex[:8]}",
        type="finetune",
        base={"name": base, "alias": "production"},
        model={"name": f"{base}-docs"},
        dataset={"uri": f"builtin:{corpus.NAME}", "task": "classification", "fraction": 0.05},
        training={
            "steps": 2,
            "batch_size": 8,
            "optimizer": {"name": "adam", "lr": 5e-5},
            "workers": 1,
            "shards": 2,
            "split": "vertical",
            "checkpoint_every": 2,
        },
        register_as={"name": f"{base}-docs", "alias": "production"},
    )
    status = await final_status(stack, job)
    assert status["state"] == "succeeded", status
    tuned = await registry.get(f"{base}-docs@production")
    assert tuned.arch == "bert" and tuned.config["num_classes"] == len(corpus.LABELS)
    assert tuned.parent is not None and tuned.parent.version == imported.version
    assert tuned.method == "finetune"

    text = triton.InferInput("text", [1], "BYTES")
    text.set_data_from_numpy(np.array(["Return the socket's own address."], dtype=np.object_))
    answer = triton.InferenceServerClient(url=inference).infer(f"{base}-docs", [text])
    probabilities = answer.as_numpy("probabilities")
    assert probabilities.shape == (1, len(corpus.LABELS))
    assert answer.as_numpy("label")[0].decode() in corpus.LABELS
