"""One namespace of job ids (maas.job_ids) on the real S3: the first job of an id holds it, the
same job again passes, another job of any type is refused naming the holder."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from maas import job_ids
from maas.errors import AlreadyExists
from maas.store import CHECKPOINTS_BUCKET
from maas.store_async import AsyncObjectStore

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


async def test_a_job_id_held_by_a_train_job_refuses_a_compress_job_and_passes_a_redelivery(stack):
    job_id = f"claimed-{uuid.uuid4().hex[:8]}"
    async with AsyncObjectStore(stack.settings) as store:
        await job_ids.claim(store, job_id, "train", "a" * 64)
        await job_ids.claim(store, job_id, "train", "a" * 64)  # a redelivery, a client's retry
        with pytest.raises(AlreadyExists, match=r"belongs to another job \(a train job"):
            await job_ids.claim(store, job_id, "compress", "b" * 64)


async def test_a_free_job_id_is_held_by_whoever_claims_it_first(stack):
    job_id = f"free-{uuid.uuid4().hex[:8]}"
    async with AsyncObjectStore(stack.settings) as store:
        await job_ids.claim(store, job_id, "compress", "c" * 64)
        with pytest.raises(AlreadyExists, match="a compress job"):
            await job_ids.claim(store, job_id, "finetune", "d" * 64)


async def test_of_services_claiming_one_id_in_the_same_instant_exactly_one_wins(stack):
    job_id = f"raced-{uuid.uuid4().hex[:8]}"
    async with AsyncObjectStore(stack.settings, threads=8) as store:
        outcomes = await asyncio.gather(
            *(job_ids.claim(store, job_id, "train", f"{n:064x}") for n in range(8)),
            return_exceptions=True,
        )
    assert sum(outcome is None for outcome in outcomes) == 1
    assert all(isinstance(o, AlreadyExists) for o in outcomes if o is not None)


async def test_a_conditional_create_leaves_an_existing_object_as_it_was(stack):
    key = f"test-create/{uuid.uuid4().hex}.json"
    async with AsyncObjectStore(stack.settings) as store:
        await store.create_bytes(CHECKPOINTS_BUCKET, key, b'{"first": true}')
        with pytest.raises(AlreadyExists, match="exists already"):
            await store.create_bytes(CHECKPOINTS_BUCKET, key, b'{"second": true}')
        assert await store.get_bytes(CHECKPOINTS_BUCKET, key) == b'{"first": true}'


async def test_whether_another_job_holds_an_id_is_read_without_claiming_it(stack):
    job_id = f"peeked-{uuid.uuid4().hex[:8]}"
    async with AsyncObjectStore(stack.settings) as store:
        assert not await job_ids.held_by_another(store, job_id, "e" * 64)  # free
        await job_ids.claim(store, job_id, "train", "a" * 64)  # so the peek claimed nothing
        assert not await job_ids.held_by_another(store, job_id, "a" * 64)  # the same job
        assert await job_ids.held_by_another(store, job_id, "b" * 64)
