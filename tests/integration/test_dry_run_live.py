"""`maas jobs submit --dry-run` asks the real S3 and a real registry whether what a job reads
is there: a missing dataset object and an unknown base are refused before anything is
published, naming the field and where to look."""

from __future__ import annotations

import io
import uuid
from collections.abc import AsyncIterator

import pytest

from infra.harness.registry import registry_in_process
from maas.config import Settings
from maas.errors import NotFound
from maas.job_preflight import preflight
from maas.store import DATASETS_BUCKET, ObjectStore

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def finetune(uri: str, base: dict[str, object]) -> dict[str, object]:
    return {"type": "finetune", "base": base, "dataset": {"uri": uri}}


@pytest.fixture
async def settings(stack, tmp_path) -> AsyncIterator[Settings]:
    """The stack's S3, and a registry (in this process) holding no models."""
    async with registry_in_process(stack.settings, tmp_path, part_size_bytes=5 << 20) as (_, c):
        yield stack.settings.replace(registry_addr=c.addr)


async def test_a_dataset_object_that_does_not_exist_is_refused_saying_how_to_add_one(settings):
    uri = f"s3://{DATASETS_BUCKET}/nothing-here-{uuid.uuid4().hex}.npz"
    with pytest.raises(NotFound, match=r"no such object; `maas datasets list` shows"):
        await preflight(finetune(uri, {"name": "digits"}), settings)


async def test_a_base_the_registry_does_not_hold_is_refused_naming_the_field(settings):
    key = f"preflight-{uuid.uuid4().hex}.npz"
    ObjectStore(settings).client.put_object(DATASETS_BUCKET, key, io.BytesIO(b"x"), 1)
    uri = f"s3://{DATASETS_BUCKET}/{key}"
    with pytest.raises(NotFound, match="base: .*model 'no-such-base' is not registered"):
        await preflight(finetune(uri, {"name": "no-such-base", "alias": "production"}), settings)
