"""One namespace of job ids (maas.job_ids) on the real S3: the first job of an id holds it, the
same job again passes, another job of any type is refused naming the holder."""

from __future__ import annotations

import uuid

import pytest

from maas import job_ids
from maas.errors import AlreadyExists
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
