"""S3 stops in the middle of an upload to the registry: the registration fails naming S3, no
version appears, no incomplete multipart upload stays behind once S3 is back, and the registry
answers throughout. A real S3 server and a real gRPC server (the registry in this process).

The outage lasts MAAS_CHAOS_S3_OUTAGE_S seconds (CI: 10; the issue's figure: 60).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import AsyncIterator
from functools import partial

import grpc
import numpy as np
import pytest
import safetensors.numpy as safetensors_numpy

from infra.harness.registry import registry_in_process
from maas.errors import NotFound
from maas.registry.client import RegistryClient
from maas.registry.v1 import registry_pb2 as pb
from maas.store import MODELS_BUCKET
from maas.store_async import AsyncObjectStore
from services.model_registry import service as service_module
from services.model_registry.service import STAGING_PREFIX, RegistryService

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

OUTAGE_S = float(os.environ.get("MAAS_CHAOS_S3_OUTAGE_S", "10"))
PART_BYTES = 5 * 1024 * 1024
CHUNK_BYTES = 1024 * 1024


def artifact() -> tuple[bytes, bytes]:
    """~24 MB of real safetensors and a manifest declaring its tensor."""
    weights = safetensors_numpy.save({"w": np.arange(6_000_000, dtype=np.float32)})
    manifest = {
        "arch": "mlp",
        "config": {},
        "files": {"weights.safetensors": hashlib.sha256(weights).hexdigest()},
        "tensors": {"w": {"dtype": "float32", "shape": [6_000_000]}},
        "metrics": {},
    }
    return weights, json.dumps(manifest).encode()


@pytest.fixture
async def registry(stack, tmp_path) -> AsyncIterator[tuple[RegistryService, RegistryClient]]:
    async with registry_in_process(stack.settings, tmp_path, part_size_bytes=PART_BYTES) as (
        service,
        client,
    ):
        yield service, client


async def incomplete_uploads(store: AsyncObjectStore, prefix: str) -> list[str]:
    def ls() -> list[str]:
        page = store.sync.client._list_multipart_uploads(MODELS_BUCKET, prefix=prefix)
        return [u.object_name for u in page.uploads]

    return await asyncio.to_thread(ls)


async def none_left(store: AsyncObjectStore, name: str) -> bool:
    """No object and no incomplete upload of ``name``'s, staged or at a version's prefix."""
    for prefix in (f"{name}/", STAGING_PREFIX):
        if await store.list(MODELS_BUCKET, prefix) or await incomplete_uploads(store, prefix):
            return False
    return True


async def eventually(check, timeout_s: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not await check():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.5)


async def test_s3_stopped_mid_upload_fails_the_registration_and_leaves_nothing(
    stack, registry, monkeypatch
):
    monkeypatch.setattr(service_module, "CLEANUP_FIRST_RETRY_S", 0.5)
    monkeypatch.setattr(service_module, "CLEANUP_MAX_RETRY_S", 2.0)
    service, client = registry
    store = service._store
    name = f"chaos-{os.getpid()}-{id(service) % 10_000}"
    weights, manifest = artifact()
    s3_down = asyncio.Event()

    async def requests() -> AsyncIterator[pb.RegisterVersionRequest]:
        yield pb.RegisterVersionRequest(header=pb.RegisterHeader(name=name, manifest_json=manifest))
        for start in range(0, len(weights), CHUNK_BYTES):
            if start == 3 * PART_BYTES:
                await s3_down.wait()  # two parts are in S3 (a multipart upload is open)
            chunk = pb.FileChunk(
                file="weights.safetensors", data=weights[start : start + CHUNK_BYTES]
            )
            yield pb.RegisterVersionRequest(chunk=chunk)

    call = asyncio.ensure_future(client.stub.RegisterVersion(requests()))
    await eventually(lambda: _has_uploads(store, STAGING_PREFIX), 60)  # staged till the commit
    await asyncio.to_thread(stack.local.s3.cut_off)
    try:
        s3_down.set()
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await asyncio.wait_for(call, 120)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "S3" in failed.value.details() or "s3" in failed.value.details()
        await asyncio.sleep(OUTAGE_S)
        assert await client.list_models() is not None  # the registry answers while S3 is away
    finally:
        await asyncio.to_thread(stack.local.s3.start)

    await eventually(partial(none_left, store, name), 90)
    with pytest.raises(NotFound):
        await client.get(name)
    # The number was not used up: the next registration is version 1.
    version = await client.register_files(name, {"weights.safetensors": weights}, manifest)
    assert version.version == 1


async def _has_uploads(store: AsyncObjectStore, prefix: str) -> bool:
    return bool(await incomplete_uploads(store, prefix))


async def test_start_up_sweep_aborts_uploads_a_killed_registry_left(stack, registry):
    service, _client = registry
    store = service._store
    key = f"swept-{os.getpid()}/1/weights.safetensors"
    upload_id = await asyncio.to_thread(
        store.sync.client._create_multipart_upload, MODELS_BUCKET, key, {}
    )
    assert upload_id and await incomplete_uploads(store, key)
    await service.sweep_incomplete_uploads()
    assert not await incomplete_uploads(store, key)
