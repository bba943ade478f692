"""Stream inference across a crash: the inference process is SIGKILLed while requests are still
waiting on maas.infer.v1 and started again; every request id is then answered exactly once on
maas.predictions.v1 as a read_committed reader sees it — none lost, none twice.

MAAS_STREAM_REQUESTS requests (CI: 2000; the issue's figure: 10 000), one row each, msgpack, sent
by a plain aiokafka producer: half before the kill, half just before it.
"""

from __future__ import annotations

import os
import signal
import time
import uuid

import numpy as np
import pytest

from infra.harness.offsets import wait_committed
from infra.harness.serving import ServiceProcesses
from infra.harness.stream import TopicReader, request_event, send_requests
from maas import zoo
from maas.registry import RegistryClient
from maas.topics import INFER
from services.inference.kafka_stream import GROUP_ID

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

REQUESTS = int(os.environ.get("MAAS_STREAM_REQUESTS", "2000"))
MLP = {"in_features": 64, "hidden": [32], "num_classes": 10}
ENV = {"MAAS_AUTH": "off", "MAAS_INFERENCE_STREAM": "on", "MAAS_INFERENCE_MAX_BATCH_SIZE": "64"}
WAIT_S = 300.0


def kill(processes: ServiceProcesses, name: str) -> None:
    os.kill(processes.pid(name), signal.SIGKILL)
    deadline = time.monotonic() + 30
    while processes.started[name].process.alive():
        assert time.monotonic() < deadline, f"{name} outlived SIGKILL"
        time.sleep(0.1)


async def test_every_request_is_answered_exactly_once_across_a_sigkill_mid_stream(stack, tmp_path):
    with ServiceProcesses(tmp_path) as processes:
        registry_addr = processes.start_registry()
        processes.start_inference("inference", registry_addr, **ENV)
        name = f"stream-chaos-{uuid.uuid4().hex[:8]}"
        settings = stack.settings.replace(registry_addr=registry_addr)
        async with RegistryClient(settings, actor="test-stream-chaos") as registry:
            module = zoo.build("mlp", MLP, seed=9).eval()
            await registry.register(module, name, "mlp", MLP, alias="production")
        x = np.random.default_rng(0).standard_normal((REQUESTS, 64)).astype(np.float32)
        request_ids = [f"chaos-{name}-{i}" for i in range(REQUESTS)]
        requests = [request_event(rid, name, x[i : i + 1]) for i, rid in enumerate(request_ids)]
        async with TopicReader(stack.settings) as reader:
            await send_requests(stack.settings, requests[: REQUESTS // 2])
            while not reader.counts(request_ids):  # the stream is answering
                await reader.poll()
            await send_requests(stack.settings, requests[REQUESTS // 2 :])
            kill(processes, "inference")
            answered_at_kill = len(reader.counts(request_ids))
            processes.start_inference("inference", registry_addr, **ENV)
            await reader.wait_for(request_ids, WAIT_S)
            await wait_committed(stack.settings, GROUP_ID, INFER, WAIT_S)
            await reader.drain()  # anything written twice would be here by now
        counts = reader.counts(request_ids)
    assert answered_at_kill < REQUESTS  # the kill came mid-stream
    assert len(counts) == REQUESTS
    assert [rid for rid, n in counts.items() if n > 1] == []
