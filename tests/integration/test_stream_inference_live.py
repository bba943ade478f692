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
from aiokafka.partitioner import DefaultPartitioner

from infra.harness.serving import ServiceProcesses
from infra.harness.stream import (
    TopicReader,
    request_event,
    send_raw,
    send_requests,
)
from maas import events, zoo
from maas.registry import RegistryClient
from maas.topics import DLQ, INFER, Topic

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


async def reply_topic(stack, **configs: str) -> Topic:
    """A topic of the test's own for predictions (``configs``: its Kafka topic configs)."""
    replies = Topic(f"replies-{uuid.uuid4().hex[:8]}", 1, "request id")
    admin = AIOKafkaAdminClient(bootstrap_servers=stack.settings.kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(replies.name, 1, 1, topic_configs=configs)])
    finally:
        await admin.close()
    return replies


async def delete_topic(stack, topic: Topic) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=stack.settings.kafka_bootstrap)
    await admin.start()
    try:
        await admin.delete_topics([topic.name])
    finally:
        await admin.close()


def same_partition_ids(first: str, n: int) -> list[str]:
    """``n`` request ids that land on ``first``'s partition of maas.infer.v1 (keyed by id)."""
    partitions = list(range(INFER.partitions))
    home = DefaultPartitioner()(first.encode(), partitions, partitions)
    candidates = (f"{first}-after-{i}" for i in range(10_000))
    return [
        rid
        for rid in candidates
        if DefaultPartitioner()(rid.encode(), partitions, partitions) == home
    ][:n]


async def test_a_prediction_goes_to_the_topic_the_request_names(stack, model):
    name, _ = model
    (rid,) = ids(1)
    replies = await reply_topic(stack)
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


async def test_a_prediction_the_broker_refuses_is_dead_lettered_and_its_partition_goes_on(
    stack, model
):
    """A reply topic whose max.message.bytes is under the prediction: the broker refuses the
    write for good. Before, the transaction was retried without end and every later request
    of that partition waited behind it."""
    name, _ = model
    (refused,) = ids(1)
    after = same_partition_ids(refused, 2)
    small = await reply_topic(stack, **{"max.message.bytes": "2000"})
    x = rows(200, seed=6)  # 200 rows of 10 outputs: ~16 kB of prediction
    async with TopicReader(stack.settings) as reader:
        await send_requests(
            stack.settings,
            [request_event(refused, name, x, reply_to=small.name)]
            + [request_event(rid, name, x[:1]) for rid in after],
        )
        counts = await reader.wait_for(after, WAIT_S)
    assert counts == {rid: 1 for rid in after}
    reason = (await dead_letters(stack, {refused}))[refused]["reason"]
    assert reason["code"] == "failed_precondition"
    assert "MessageSizeTooLarge" in reason["message"] and small.name in reason["message"]


async def test_a_reply_topic_deleted_after_use_is_dead_lettered_and_its_partition_goes_on(
    stack, model
):
    """The topic was written once (known, and in the producer's metadata), then deleted: the
    send waited for it without end, holding the partition (and the process's stop)."""
    name, _ = model
    (first,) = ids(1)
    gone, *after = same_partition_ids(first, 3)
    replies = await reply_topic(stack)
    x = rows(1, seed=7)
    async with TopicReader(stack.settings, replies) as reader:
        await send_requests(stack.settings, [request_event(first, name, x, reply_to=replies.name)])
        await reader.wait_for([first], WAIT_S)
    await delete_topic(stack, replies)
    async with TopicReader(stack.settings) as reader:
        await send_requests(
            stack.settings,
            [request_event(gone, name, x, reply_to=replies.name)]
            + [request_event(rid, name, x) for rid in after],
        )
        counts = await reader.wait_for(after, WAIT_S)
    assert counts == {rid: 1 for rid in after}
    reason = (await dead_letters(stack, {gone}))[gone]["reason"]
    assert reason["code"] == "not_found" and replies.name in reason["message"]


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
