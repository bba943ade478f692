"""A canary on the real stack: a registry and an inference server as processes, real Kafka and
S3, tritonclient over gRPC. A 90/10 split of production splits 2 000 requests 90 ± 3 %, a routing
key sticks to one version, each version has its own Prometheus series, and moving the alias back
under 4 concurrent clients fails no request."""

from __future__ import annotations

import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import tritonclient.grpc as triton
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from infra.harness.serving import ServiceProcesses
from infra.proc import free_port
from maas import zoo
from maas.registry import RegistryClient

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

MLP = {"in_features": 8, "hidden": [8], "num_classes": 2}
REQUESTS = 2_000
CLIENTS = 4
X = np.random.default_rng(0).standard_normal((1, 8)).astype(np.float32)


@dataclass
class Servers:
    registry: str
    inference: str
    metrics_port: int


@pytest.fixture(scope="module")
def servers(stack, tmp_path_factory):
    with ServiceProcesses(tmp_path_factory.mktemp("canary")) as processes:
        registry = processes.start_registry()
        metrics_port = free_port()
        inference = processes.start_inference(
            "inference-canary",
            registry,
            MAAS_AUTH="off",
            MAAS_INFERENCE_METRICS_PORT=str(metrics_port),
        )
        yield Servers(registry, inference, metrics_port)


@pytest.fixture(scope="module")
async def registry(stack, servers):
    settings = stack.settings.replace(registry_addr=servers.registry)
    async with RegistryClient(settings, actor="test-canary") as client:
        yield client


async def two_versions(registry: RegistryClient) -> str:
    name = f"canary-{uuid.uuid4().hex[:8]}"
    for seed in (1, 2):
        module = zoo.build("mlp", MLP, seed=seed).eval()
        await registry.register(module, name, "mlp", MLP, alias="production" if seed == 1 else None)
    return name


def ask(client: triton.InferenceServerClient, name: str, routing_key: str = "") -> int:
    tensor = triton.InferInput("input", list(X.shape), "FP32")
    tensor.set_data_from_numpy(X)
    parameters = {"maas-routing-key": routing_key} if routing_key else None
    result = client.infer(name, [tensor], model_version="production", parameters=parameters)
    return int(result.get_response().model_version)


def wait_until(condition: Callable[[], bool], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


@pytest.fixture(scope="module")
async def canary(servers, registry) -> str:
    """A model whose production is split 90/10 over versions 1 and 2, as the server sees it."""
    name = await two_versions(registry)
    client = triton.InferenceServerClient(servers.inference)
    assert ask(client, name) == 1
    change = await registry.set_split(name, "production", [(1, 90), (2, 10)], reason="canary")
    assert change.targets == ((1, 90), (2, 10))
    wait_until(lambda: ask(client, name) == 2)  # the alias-set event reached the server
    client.close()
    return name


def test_a_90_10_canary_splits_2000_requests_90_plus_minus_3_percent(servers, canary):
    client = triton.InferenceServerClient(servers.inference)
    try:
        counts = Counter(ask(client, canary) for _ in range(REQUESTS))
    finally:
        client.close()
    assert set(counts) == {1, 2}
    assert 0.87 * REQUESTS <= counts[1] <= 0.93 * REQUESTS, counts


def test_a_routing_key_sticks_to_one_version(servers, canary):
    client = triton.InferenceServerClient(servers.inference)
    try:
        by_key = {key: {ask(client, canary, key) for _ in range(10)} for key in ("a", "b", "c")}
    finally:
        client.close()
    assert all(len(versions) == 1 for versions in by_key.values()), by_key


def test_each_version_of_the_split_has_its_own_request_and_latency_series(servers, canary):
    with urllib.request.urlopen(f"http://127.0.0.1:{servers.metrics_port}/metrics") as reply:
        families = {f.name: f for f in text_string_to_metric_families(reply.read().decode())}

    def value(family: str, sample: str, version: str, **labels: str) -> float:
        wanted = {"model": canary, "version": version, **labels}
        found = [
            s.value for s in families[family].samples if s.name == sample and s.labels == wanted
        ]
        return found[0] if found else 0.0

    for version in ("1", "2"):
        ok = value("maas_inference_version_requests", "maas_inference_version_requests_total",
                   version, outcome="ok")  # fmt: skip
        timed = value("maas_inference_version_request_seconds",
                      "maas_inference_version_request_seconds_count", version)  # fmt: skip
        assert ok > 0 and timed == ok


async def test_moving_the_alias_back_under_4_clients_fails_no_request(servers, registry):
    name = await two_versions(registry)
    await registry.set_split(name, "production", [(1, 50), (2, 50)])
    answers: list[list[int | str]] = [[] for _ in range(CLIENTS)]
    stop = threading.Event()

    def keep_asking(i: int) -> None:
        client = triton.InferenceServerClient(servers.inference)
        try:
            while not stop.is_set():
                try:
                    answers[i].append(ask(client, name))
                except InferenceServerException as exc:
                    answers[i].append(str(exc))
        finally:
            client.close()

    threads = [threading.Thread(target=keep_asking, args=(i,)) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: all(a.count(2) >= 10 for a in answers))  # the split is served
        await registry.set_alias(name, "production", 1, reason="rollback")
        marks = [len(a) for a in answers]
        # Rolled back: every client's last 20 answers came from version 1.
        wait_until(
            lambda: all(
                len(a) >= m + 20 and set(a[-20:]) == {1}
                for a, m in zip(answers, marks, strict=True)
            )
        )
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    failed = [x for a in answers for x in a if isinstance(x, str)]
    assert failed == []
    history = await registry.alias_history(name, "production")
    assert [(c.targets, c.reason) for c in history[-2:]] == [
        (((1, 50), (2, 50)), ""),
        ((), "rollback"),
    ]
