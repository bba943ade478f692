"""`maas jobs submit --dry-run` asks the real S3 and a real registry whether what a job reads
is there: a missing dataset object, an unknown base and a compress method the base cannot take
are refused before anything is published, naming the field and where to look."""

from __future__ import annotations

import io
import uuid
from collections.abc import AsyncIterator

import pytest

from infra.harness.registry import registry_in_process
from maas import zoo
from maas.config import Settings
from maas.errors import InvalidArgument, NotFound
from maas.job_preflight import preflight
from maas.registry import RegistryClient
from maas.store import DATASETS_BUCKET, ObjectStore

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def finetune(uri: str, base: dict[str, object]) -> dict[str, object]:
    return {"type": "finetune", "base": base, "dataset": {"uri": uri}}


@pytest.fixture
async def registry(stack, tmp_path) -> AsyncIterator[RegistryClient]:
    """A registry (in this process, objects in the stack's S3) holding no models."""
    async with registry_in_process(stack.settings, tmp_path, part_size_bytes=5 << 20) as (_, c):
        yield c


@pytest.fixture
def settings(stack, registry) -> Settings:
    return stack.settings.replace(registry_addr=registry.addr)


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


async def test_a_compress_method_that_cannot_run_on_the_base_is_refused_before_publishing(
    settings, registry
):
    # Distilling a regression model passed a dry run, then failed after two variants.
    config = {"in_features": 16, "num_classes": 1}
    model = zoo.build("mlp", config, seed=0)
    await registry.register(
        model, "dry-reg", "mlp", config, method="train", settings={"dataset": "builtin:regression"}
    )
    job = {
        "type": "compress",
        "base": {"name": "dry-reg", "version": 1},
        "compress": {"methods": [{"quantize": {"dtype": "int8"}}, {"distill": {"steps": 5}}]},
    }
    with pytest.raises(InvalidArgument, match=r"methods\[1\] \(distill\) on dry-reg@1: distill"):
        await preflight(job, settings)
