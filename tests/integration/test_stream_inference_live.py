"""Stream inference as a Kafka user sees it: requests on maas.infer.v1 from a plain aiokafka
producer, predictions read with read_committed from maas.predictions.v1 (or reply_to), bad
requests on maas.dlq.v1 with their reason — a real inference process, registry, broker and S3.
"""

from __future__ import annotations

import urllib.request
import uuid

import msgpack
import numpy as np
import pytest
import torch
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from infra.harness.serving import ServiceProcesses
from infra.harness.stream import (
    TopicReader,
    request_event,
    send_raw,
    send_requests,
)
from maas import events, zoo
from maas.registry import RegistryClient
from maas.topics import DLQ, Topic

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

MLP = {"in_features": 64, "hidden": [32], "num_classes": 10}
WAIT_S = 120.0


@pytest.fixture(scope="module")
def servers(stack, tmp_path_factory):
    with ServiceProcesses(tmp_path_factory.mktemp("stream")) as processes:
        registry = processes.start_registry()
        processes.start_inference(
            "inference",
            registry,
            MAAS_AUTH="off",
            MAAS_INFERENCE_MAX_BATCH_SIZE="64",
            MAAS_INFERENCE_STREAM="on",
        )
        yield processes, registry


@pytest.fixture(scope="module")
async def model(stack, servers):
    _, registry_addr = servers
    name = f"stream-mlp-{uuid.uuid4().hex[:8]}"
    module = zoo.build("mlp", MLP, seed=5).eval()
    settings = stack.settings.replace(registry_addr=registry_addr)
    async with RegistryClient(settings, actor="test-stream") as registry:
        await registry.register(module, name, "mlp", MLP, alias="production")
    return name, module


def rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 64)).astype(np.float32)


def ids(n: int) -> list[str]:
    run = uuid.uuid4().hex[:8]
    return [f"req-{run}-{i}" for i in range(n)]


def expected(module: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return module(torch.from_numpy(x)).numpy()


def output_of(prediction: dict) -> np.ndarray:
    (output,) = prediction["outputs"]
    return np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])


async def dead_letters(stack, keys: set[str]) -> dict[str, dict]:
    """The DLQ events for ``keys`` (read from the start: the DLQ is small)."""
    async with TopicReader(stack.settings, DLQ, from_start=True) as reader:
        await reader.wait_for(sorted(keys), WAIT_S)
    return {key: event for key, event in reader.events if key in keys}


async def test_every_request_gets_one_prediction_equal_to_the_models_output(stack, model):
    name, module = model
    x = rows(200, seed=1)
    request_ids = ids(len(x))
    async with TopicReader(stack.settings) as reader:
        await send_requests(
            stack.settings,
            [request_event(rid, name, x[i : i + 1]) for i, rid in enumerate(request_ids)],
        )
        counts = await reader.wait_for(request_ids, WAIT_S)
    assert set(counts.values()) == {1}
    got = {key: event for key, event in reader.events if key in counts}
    for i, rid in enumerate(request_ids):
        assert got[rid]["request_id"] == rid and got[rid]["model"] == name
        assert got[rid]["version"] == 1
        np.testing.assert_allclose(
            output_of(got[rid]), expected(module, x[i : i + 1]), rtol=1e-5, atol=1e-6
        )


async def test_json_requests_get_json_predictions_and_raw_msgpack_bytes_are_accepted(stack, model):
    name, module = model
    x = rows(2, seed=2)
    json_id, raw_id = ids(2)
    async with TopicReader(stack.settings) as reader:
        await send_requests(stack.settings, [request_event(json_id, name, x[:1])], as_json=True)
        await send_requests(stack.settings, [request_event(raw_id, name, x[1:], raw=True)])
        await reader.wait_for([json_id, raw_id], WAIT_S)
    got = dict(reader.events)
    assert reader.content_types[json_id] == events.JSON_CONTENT_TYPE
    assert reader.content_types[raw_id] == ""
    np.testing.assert_allclose(output_of(got[raw_id]), expected(module, x[1:]), rtol=1e-5)


async def test_a_prediction_goes_to_the_topic_the_request_names(stack, model):
    name, _ = model
    (rid,) = ids(1)
    replies = Topic(f"replies-{uuid.uuid4().hex[:8]}", 1, "request id")
    admin = AIOKafkaAdminClient(bootstrap_servers=stack.settings.kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(replies.name, 1, 1)])
    finally:
        await admin.close()
    async with TopicReader(stack.settings, replies) as reader:
        await send_requests(
            stack.settings, [request_event(rid, name, rows(1, seed=4), reply_to=replies.name)]
        )
        counts = await reader.wait_for([rid], WAIT_S)
    assert counts == {rid: 1}


async def test_bad_requests_go_to_the_dlq_with_a_reason_naming_the_field(stack, model):
    name, _ = model
    unknown, shape, missing_topic, platform, garbage = ids(5)
    bad_shape = request_event(shape, name, rows(1, seed=3)[:, :10])
    await send_requests(
        stack.settings,
        [
            request_event(unknown, "no-such-model", rows(1, seed=3)),
            bad_shape,
            request_event(missing_topic, name, rows(1, seed=3), reply_to="nobody-made-this"),
            request_event(platform, name, rows(1, seed=3), reply_to="maas.jobs.v1"),
        ],
    )
    await send_raw(stack.settings, garbage, b"\xc1 not msgpack")
    letters = await dead_letters(stack, {unknown, shape, missing_topic, platform, garbage})
    reasons = {key: letter["reason"] for key, letter in letters.items()}
    assert (
        reasons[unknown]["code"] == "not_found" and "no-such-model" in reasons[unknown]["message"]
    )
    assert "input" in reasons[shape]["message"] and "64" in reasons[shape]["message"]
    assert "nobody-made-this" in reasons[missing_topic]["message"]
    assert "reply_to" in reasons[platform]["message"]
    assert "msgpack" in reasons[garbage]["message"]
    assert all(letter["source_topic"] == "maas.infer.v1" for letter in letters.values())
    assert msgpack.unpackb(letters[shape]["original"])["id"] == shape


async def test_the_stream_counts_records_on_the_metrics_endpoint(stack, servers, model):
    processes, _ = servers
    (rid,) = ids(1)
    async with TopicReader(stack.settings) as reader:
        await send_requests(stack.settings, [request_event(rid, model[0], rows(1, seed=5))])
        await reader.wait_for([rid], WAIT_S)
    port = processes.metrics_port("inference")
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for outcome in ("consumed", "produced"):
        sample = f'maas_inference_stream_records_total{{outcome="{outcome}"}} '
        (line,) = [line for line in text.splitlines() if line.startswith(sample)]
        assert float(line.split()[-1]) >= 1
    assert "maas_inference_stream_transaction_records_bucket" in text
