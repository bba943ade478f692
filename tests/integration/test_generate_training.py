"""The GPT end to end on the real stack, as `maas demo` runs it: the example train job (CI-sized)
published on Kafka, trained by the coordinator, two aggregator shards (vertical split) and two
gradient workers, registered with held-out perplexity, then streamed token by token from the real
inference process over tritonclient."""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.harness.serving import ServiceProcesses
from infra.harness.training import TrainingProcesses
from maas import jobs
from maas.cli_jobs import follow
from maas.config import Settings
from maas.registry import RegistryClient
from maas.text.gpt import GPT
from maas.text.sampling import SamplingParams, generate
from maas.text.stream import stream_completion

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "jobs" / "train-gpt.yaml"


@pytest.fixture(scope="module")
def platform(stack, tmp_path_factory) -> Iterator[Settings]:
    workdir = tmp_path_factory.mktemp("generate-training")
    with ServiceProcesses(workdir) as processes:
        registry = processes.start_registry()
        with TrainingProcesses(workdir, registry, workers=2, shards=2) as training:
            training.start()
            inference = processes.start_inference("inference-gpt", registry)
            yield stack.settings.replace(registry_addr=registry, inference_addr=inference)


async def test_a_gpt_trained_as_a_platform_job_streams_its_completion(platform: Settings) -> None:
    name = f"it-pygpt-{uuid.uuid4().hex[:8]}"
    doc = jobs.load_job_file(EXAMPLE)
    doc["model"]["name"] = name
    doc["register_as"] = {"name": name, "alias": "production"}
    doc["training"].update(steps=24, batch_size=8, checkpoint_every=12)
    job = jobs.check_job(jobs.prepare_job(doc, f"it-gpt-{uuid.uuid4().hex[:8]}"), platform)
    await jobs.publish_job(platform, job)
    summary = await follow(platform, job["job_id"], timeout_s=400)
    assert summary.state == "succeeded", summary
    async with RegistryClient(platform) as registry:
        version = await registry.get(f"{name}@production")
        module = await registry.load(f"{name}@production")
    assert isinstance(module, GPT)
    assert version.metrics["loss"] < math.log(257) - 0.5  # better than uniform over bytes
    assert version.metrics["perplexity"] == pytest.approx(math.exp(version.metrics["loss"]))
    shown: list[str] = []
    text = await asyncio.to_thread(
        stream_completion, platform, name, "def ", max_tokens=16, temperature=0, write=shown.append
    )
    expected = generate(module, "def ", SamplingParams(max_tokens=16, temperature=0))
    assert shown == [t.text for t in expected] and text == "".join(shown)
