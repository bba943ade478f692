"""What `maas jobs submit --dry-run` checks beyond the file (``maas.jobs.check_job``): that what
the job reads is there. A train job on a builtin dataset is planned as the coordinator plans it
(the rows fit the model, the split and the batch fit the workers and shards), an ``s3://``
dataset must exist, a base model (finetune, compress) must resolve, and a compress job's methods
(and a builtin dataset) must fit its base. Each of these passed a dry run and failed the job
seconds after it was published, its id used up.

Nothing is downloaded: an ``s3://`` dataset's rows are judged by the service that runs the job.
"""

from __future__ import annotations

from typing import Any

from maas.config import Settings
from maas.errors import InvalidArgument, NotFound
from maas.registry.types import ModelRef, ModelVersion

BUILTIN_PREFIX = "builtin:"


async def preflight(job: dict[str, Any], settings: Settings) -> None:
    """InvalidArgument or NotFound naming the field whose target is missing or does not fit;
    Unavailable when S3 or the registry cannot be asked."""
    uri = (job.get("dataset") or {}).get("uri")
    if isinstance(uri, str) and uri.startswith(BUILTIN_PREFIX):
        if job["type"] == "train":
            _plan_builtin_train(job, settings)
    elif isinstance(uri, str):
        await _check_object(uri, settings)
    if "base" in job:
        base = await _check_base(job["base"], settings)
        if job["type"] == "compress":
            _check_compress(job, base)


def _plan_builtin_train(job: dict[str, Any], settings: Settings) -> None:
    from maas.training.prepare import Limits, prepare_job

    prepare_job(job, limits=Limits.from_settings(settings))


async def _check_object(uri: str, settings: Settings) -> None:
    from maas.store import parse_uri
    from maas.store_async import AsyncObjectStore

    bucket, key = parse_uri(uri)
    async with AsyncObjectStore(settings, threads=1) as store:
        if not await store.exists(bucket, key):
            raise NotFound(
                f"dataset.uri {uri}: no such object; `maas datasets list` shows the datasets, "
                "`maas datasets upload FILE NAME` adds one"
            )


async def _check_base(base: dict[str, Any], settings: Settings) -> ModelVersion:
    from maas.registry.client import RegistryClient

    ref = ModelRef(base["name"], version=base.get("version"), alias=base.get("alias"))
    async with RegistryClient(settings, actor="maas-cli") as client:
        try:
            return await client.get(ref)
        except NotFound as exc:
            raise NotFound(f"base: {exc.message}") from None
        except InvalidArgument as exc:
            raise InvalidArgument(f"base: {exc.message}") from None


def _check_compress(job: dict[str, Any], base: ModelVersion) -> None:
    """Each method against the base, as the compressor checks them before its first variant,
    and a builtin dataset's rows and labels against the base (an S3 one is judged there)."""
    from maas import datasets
    from maas.compression.pipeline import check_dataset, check_method, parse_methods
    from maas.manifest import Manifest

    manifest = Manifest.from_json(base.manifest_json)
    named = job.get("dataset") or manifest.settings.get("dataset") or {}
    uri = named if isinstance(named, str) else str(named.get("uri", ""))
    task = None
    if uri.startswith(BUILTIN_PREFIX):
        data = datasets.load_builtin(uri.removeprefix(BUILTIN_PREFIX))
        check_dataset(manifest.arch, manifest.config, data, str(base.ref))
        task = data.task
    for index, plan in enumerate(parse_methods(job["compress"]["methods"])):
        check_method(index, plan, manifest.arch, manifest.config, task, str(base.ref))
