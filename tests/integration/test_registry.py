"""The model registry as its users see it: a real server process on a free port, the real S3
server holding the artifacts, the real broker carrying its events.

The last test stops the broker; keep it last (it restarts the broker before it ends).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import torch
from aiokafka import AIOKafkaConsumer, TopicPartition

import maas.registry
from infra.harness.registry import RegistryProcess
from infra.proc import free_port
from maas import events, zoo
from maas.artifacts import pack
from maas.config import Settings
from maas.errors import FailedPrecondition, IntegrityError, MaasError, NotFound, Unavailable
from maas.manifest import WEIGHTS_FILE
from maas.registry import RegistryClient
from maas.registry.types import ModelRef
from maas.store import MODELS_BUCKET, ObjectStore
from maas.topics import MODELS

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

CNN: dict[str, Any] = {}
MLP = {"in_features": 64, "hidden": [32], "num_classes": 10}


@pytest.fixture(scope="module")
def registry_process(stack, tmp_path_factory) -> Iterator[RegistryProcess]:
    process = RegistryProcess(stack.settings, tmp_path_factory.mktemp("registry"))
    process.start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
async def client(registry_process: RegistryProcess) -> AsyncIterator[RegistryClient]:
    async with RegistryClient(registry_process.settings, actor="integration") as c:
        yield c


def a_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def model_events(
    settings: Settings, name: str, count: int, timeout_s: float = 90
) -> list[dict[str, Any]]:
    """The first ``count`` events about ``name`` on maas.models.v1, in log order."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False
    )
    await consumer.start()
    try:
        partitions = [TopicPartition(MODELS.name, p) for p in range(MODELS.partitions)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        found: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout_s
        while len(found) < count and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            for records in batches.values():
                for record in records:
                    try:
                        event = events.decode(record.value, record.headers)
                    except MaasError:
                        continue  # the fuzzers' poison, earlier in the session: not ours
                    if event.get("name") == name:
                        found.append(event)
        return found
    finally:
        await consumer.stop()


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa
    )


async def test_register_get_load_gives_bit_identical_weights(client: RegistryClient) -> None:
    name = a_name("cnn")
    model = zoo.build("cnn", CNN, seed=3)
    registered = await client.register(
        model,
        name,
        "cnn",
        CNN,
        method="train",
        job_id="job-7",
        metrics={"accuracy": 0.5},
        alias="production",
    )
    got = await client.get(f"{name}@production")
    assert (got.version, got.job_id, got.metrics, got.aliases) == (
        1,
        "job-7",
        {"accuracy": 0.5},
        ("production",),
    )
    assert got == registered
    loaded = await client.load(f"{name}@1")
    assert same_weights(model, loaded)
    assert not loaded.training


async def test_the_artifact_is_safetensors_plus_manifest_under_name_and_version(
    client: RegistryClient, stack
) -> None:
    name = a_name("layout")
    version = await client.register(zoo.build("mlp", MLP), name, "mlp", MLP)
    keys = sorted(o.key for o in ObjectStore(stack.settings).list(MODELS_BUCKET, f"{name}/"))
    assert keys == [f"{name}/1/manifest.json", f"{name}/1/{WEIGHTS_FILE}"]
    manifest = ObjectStore(stack.settings).get_bytes(MODELS_BUCKET, f"{name}/1/manifest.json")
    assert manifest == version.manifest_json
    # Staged, then copied on the S3 server: the copy records its sha256 as every write does.
    weights = ObjectStore(stack.settings).stat(MODELS_BUCKET, f"{name}/1/{WEIGHTS_FILE}")
    assert weights.sha256 == {f.name: f.sha256 for f in version.files}[WEIGHTS_FILE]


async def test_twenty_concurrent_registrations_get_versions_one_to_twenty(
    client: RegistryClient,
) -> None:
    name = a_name("race")
    model = zoo.build("mlp", MLP)
    results = await asyncio.gather(*(client.register(model, name, "mlp", MLP) for _ in range(20)))
    assert sorted(v.version for v in results) == list(range(1, 21))
    listed = [v.version async for v in client.iter_versions(name)]
    assert listed == list(range(20, 0, -1))


async def test_alias_moves_emit_alias_set_events_in_order(
    client: RegistryClient, registry_process: RegistryProcess
) -> None:
    name = a_name("alias")
    model = zoo.build("mlp", MLP)
    for _ in range(3):
        await client.register(model, name, "mlp", MLP)
    for version in (1, 3, 2):
        await client.set_alias(name, "production", version)
    found = await model_events(registry_process.settings, name, count=6)
    moves = [(e["version"], e.get("previous_version")) for e in found if e["event"] == "alias-set"]
    assert moves == [(1, None), (3, 1), (2, 3)]
    history = await client.alias_history(name, "production")
    # The actor is the identity of the stack's write token, not the client's claimed "integration".
    assert [(c.from_version, c.to_version, c.actor) for c in history] == [
        (None, 1, "admin"),
        (1, 3, "admin"),
        (3, 2, "admin"),
    ]


async def test_lineage_follows_the_parent_recorded_at_registration(
    client: RegistryClient,
) -> None:
    base, tuned = a_name("base"), a_name("tuned")
    parent = await client.register(zoo.build("mlp", MLP), base, "mlp", MLP, alias="production")
    await client.register(
        zoo.build("mlp", MLP, seed=1),
        tuned,
        "mlp",
        MLP,
        parent=f"{base}@production",
        method="finetune",
    )
    lineage = await client.lineage(f"{tuned}@1")
    assert [(n.name, n.version) for n in lineage.ancestors] == [(tuned, 1), (base, 1)]
    assert [(n.name, n.method) for n in (await client.lineage(parent.ref)).children] == [
        (tuned, "finetune")
    ]


async def test_an_artifact_not_matching_its_manifest_is_refused_and_not_registered(
    client: RegistryClient, stack
) -> None:
    name = a_name("tampered")
    files, manifest = pack(zoo.build("mlp", MLP), "mlp", MLP)
    forged = dict(files, **{WEIGHTS_FILE: files[WEIGHTS_FILE][:-4] + b"\x00\x00\x00\x00"})
    with pytest.raises(FailedPrecondition, match="tampered"):
        await client.register_files(name, forged, manifest.to_json())
    with pytest.raises(NotFound, match="is not registered"):
        await client.get(name)
    assert ObjectStore(stack.settings).list(MODELS_BUCKET, f"{name}/") == []


async def test_bytes_changed_in_s3_after_registration_are_refused_on_load(
    client: RegistryClient, stack
) -> None:
    name = a_name("swapped")
    version = await client.register(zoo.build("mlp", MLP), name, "mlp", MLP)
    other, _ = pack(zoo.build("mlp", MLP, seed=9), "mlp", MLP)
    forged = other[WEIGHTS_FILE]
    # Behind the registry's back, with a matching "recorded" checksum header.
    ObjectStore(stack.settings).client.put_object(
        MODELS_BUCKET,
        version.key(WEIGHTS_FILE),
        io.BytesIO(forged),
        len(forged),
        metadata={"sha256": hashlib.sha256(forged).hexdigest()},
    )
    with pytest.raises(IntegrityError, match="tampered"):
        await client.load(version.ref)


async def test_a_version_whose_object_was_deleted_in_s3_is_a_failed_precondition(
    client: RegistryClient, stack
) -> None:
    name = a_name("deleted")
    version = await client.register(zoo.build("mlp", MLP), name, "mlp", MLP)
    ObjectStore(stack.settings).client.remove_object(MODELS_BUCKET, version.key(WEIGHTS_FILE))
    with pytest.raises(FailedPrecondition, match="registered but its artifact is missing"):
        await client.load(version.ref)


async def test_s3_down_is_unavailable_and_registers_nothing(stack, tmp_path) -> None:
    process = RegistryProcess(stack.settings, tmp_path, MAAS_S3_ENDPOINT=f"127.0.0.1:{free_port()}")
    process.start()
    try:
        async with RegistryClient(process.settings) as client:
            with pytest.raises(Unavailable):
                await client.register(zoo.build("mlp", MLP), "unreachable", "mlp", MLP)
            with pytest.raises(NotFound, match="'unreachable' is not registered"):
                await client.get("unreachable")
    finally:
        process.stop()


async def test_a_restart_keeps_versions_aliases_and_history(
    registry_process: RegistryProcess,
) -> None:
    name = a_name("restart")
    model = zoo.build("mlp", MLP, seed=5)
    async with RegistryClient(registry_process.settings) as client:
        await client.register(model, name, "mlp", MLP, alias="staging")
        await client.register(model, name, "mlp", MLP)
        await client.set_alias(name, "staging", 2)
    assert registry_process.stop()
    registry_process.start()
    async with RegistryClient(registry_process.settings) as client:
        assert (await client.get(f"{name}@staging")).version == 2
        assert [c.to_version for c in await client.alias_history(name)] == [1, 2]
        assert same_weights(model, await client.load(f"{name}@1"))
        assert (await client.register(model, name, "mlp", MLP)).version == 3


def test_the_blocking_shortcuts_register_and_load(registry_process: RegistryProcess) -> None:
    name = a_name("sync")
    model = zoo.build("mlp", MLP, seed=4)
    version = maas.registry.register(
        model, name, "mlp", MLP, alias="production", platform_settings=registry_process.settings
    )
    loaded = maas.registry.load(f"{name}@production", platform_settings=registry_process.settings)
    assert version.version == 1 and same_weights(model, loaded)


async def test_an_event_produced_while_the_broker_is_down_is_delivered_once_it_is_back(
    client: RegistryClient, registry_process: RegistryProcess, stack
) -> None:
    name = a_name("outbox")
    with stack.broker_down():
        registered = await client.register(zoo.build("mlp", MLP), name, "mlp", MLP)
    assert registered.ref == ModelRef(name, version=1)
    found = await model_events(registry_process.settings, name, count=1, timeout_s=120)
    assert [(e["event"], e["version"]) for e in found] == [("registered", 1)]
